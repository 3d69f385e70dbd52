"""One Consensus Monte Carlo shard: sampling coordinates, tempered prior, likelihood, NUTS.

Sampling coordinates w
    With alpha ≈ 0 the data fix J(t) = D0 t**alpha + D_offset over the window but not
    D0, alpha and D_offset separately: in (D0, alpha) the posterior is a thin curved
    ridge (D0·alpha ≈ const) that NUTS cannot cross. NUTS therefore samples

        w = (u_D0, s_J, y_J [, u_g0, s_g, y_g, phi0])

    with s_J = alpha·D0 = dJ/dln t and y_J = D0 + D_offset = J, both at t = 1 s, and
    u_D0 the position of log D0 (logit scale) inside the interval that every bound
    allows for this (s_J, y_J); likewise for the shear rate (gamma_dot_t0, beta,
    gamma_dot_t_offset). The data determine (s, y) whatever the amplitude is, so the
    ridge becomes a straight valley along u, and no bound is ever crossed (see
    :class:`Coordinates`).

Prior (weakly informative, inside the bounds), defined on w
    u ~ Normal(0, 1) (log D0 anywhere in its allowed interval, the middle favoured);
    s ~ Normal(0, (largest slope the bounds allow)²); y ~ Normal(centre, half-range²)
    of the bounds of D0 + D_offset; times a logit-normal factor (logit sd 1) on each
    exponent (alpha, beta) and on phi0, inside their bounds; zero outside the bounds.
    It is a prior on the physics parameters (through the one-to-one map w -> θ), but
    not one of independent factors per parameter: placed on w, it does not favour
    small amplitudes the way independent priors on (D0, alpha) do through the Jacobian
    1/D0 (the prior volume of alpha at fixed slope), which pulls the posterior of an
    undetermined D0 to its lower bound and alpha to its bounds. The prior density of
    w is raised to 1/K in each of the K shards (Scott et al., 2016, Eq. 2), in w, the
    space where the shards are combined: the product of the K shard targets is the
    full posterior of w, and for the Normal factors the tempered sub-priors multiply
    back exactly even under the Gaussian consensus rule.

Likelihood
    c2 = offset_k + contrast_k·G(θ) + e with e ~ Normal(0, var_k), one var_k per (q, phi)
    bin, fixed: the least-squares residual variance times an inflation factor for the
    correlated noise (see ``_cmc_noise``). contrast_k and offset_k enter linearly and
    are integrated out analytically under a flat prior; per bin this leaves

        log L_k(θ) = -RSS_k(θ) / (2 var_k) - ½ log det M_k(θ) + const,

    RSS_k the residual sum of squares at the best contrast/offset for this θ and M_k
    the 2×2 Gram matrix of [G, 1]. Marginalising per shard gives each shard its own
    contrast/offset; shards interleaved over the whole map (``shard_of``) have nearly
    the same θ-information about them, so the loss against shared values is second
    order (the consensus test measures it: sds within a few % of full-data NUTS).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from xpcsfit import model as _model

PRIOR_SD = 1.0  # sd of u (amplitude position, logit scale) and of the exponent/phi0 logits


# ---------------------------------------------------------------- coordinates, prior


@dataclass(frozen=True)
class Coordinates:
    """Map between physics parameters θ and NUTS's sampling coordinates w.

    Per power law (A t**e + o: (D0, alpha, D_offset) and, in laminar_flow,
    (gamma_dot_t0, beta, gamma_dot_t_offset)) three coordinates (u, s, y):

        s = e·A    (the slope d/dln t at t = 1 s)      y = A + o  (the value at t = 1 s)
        log A = a + (b - a)·sigmoid(u)

    with [a, b] the log-amplitudes that every bound allows for this (s, y) (see
    ``_interval``): the exponent s/A and the offset y - A stay inside their bounds by
    construction, for any u. Without it the exponent bound cuts the allowed slope
    down in proportion to A, and the offset bound cuts the amplitude off at a wall:
    funnels and walls where NUTS diverges. phi0 is sampled as it is.

    Parameters
    ----------
    mode : {"static", "laminar_flow"}
    names : tuple of str
        Physics parameter names in θ order (``xpcsfit.parameters.MODES[mode]``).
    lower, upper : tuple of float
        Bounds of each physics parameter (same order); D0 and gamma_dot_t0 need
        lower > 0, alpha and beta lower < 0 < upper.
    """

    mode: str
    names: tuple
    lower: tuple
    upper: tuple

    @property
    def blocks(self):
        out = [("D0", "alpha", "D_offset")]
        if self.mode == "laminar_flow":
            out.append(("gamma_dot_t0", "beta", "gamma_dot_t_offset"))
        return out

    @property
    def w_names(self) -> list[str]:
        out = ["u_D0", "dJ_dlnt_at_1s", "J_at_1s"]
        if self.mode == "laminar_flow":
            out += ["u_gamma_dot_t0", "dgamma_dot_dlnt_at_1s", "gamma_dot_at_1s", "phi0"]
        return out

    def _b(self, name):
        i = self.names.index(name)
        return self.lower[i], self.upper[i]

    def _interval(self, s, y, names):
        """(a, b): log of the smallest and largest amplitude A allowed by every bound.

        A >= A_lo, A >= m(s) (the exponent s/A inside its bounds: m = s/e_hi for s > 0,
        s/e_lo for s < 0) and A >= y - o_hi; A <= A_hi and A <= y - o_lo (the offset
        y - A inside its bounds). The maxima and minima are smooth (a root of a sum of
        squares; a soft minimum of order 16), continuously differentiable so that
        NUTS's leapfrog steps meet no kink where the slope s changes sign. They lie
        inside the exact limits (by at most a factor √3 and 2^(1/16)), so the prior is
        zero on thin slivers next to the bounds.
        """
        import jax.numpy as jnp

        amp, exponent, offset = names
        a_lo, a_hi = self._b(amp)
        e_lo, e_hi = self._b(exponent)
        o_lo, o_hi = self._b(offset)
        m = jnp.where(s > 0, s / e_hi, s / e_lo)
        d = jnp.maximum(y - o_hi, 0.0)
        a = 0.5 * jnp.log(a_lo * a_lo + m * m + d * d)
        c = jnp.maximum(y - o_lo, 1e-300)
        k = 16.0
        b = -jnp.logaddexp(-k * np.log(a_hi), -k * jnp.log(c)) / k
        # Where the bounds leave no amplitude at all (a >= b) the prior is zero; keep the
        # map defined there (the prior's bound checks return -inf).
        b = jnp.maximum(b, a + 1e-9)
        return a, b

    def _block(self, w3, names):
        """(A, e, o, log dlogA/du) of one power law from its (u, s, y)."""
        import jax
        import jax.numpy as jnp

        u, s, y = w3
        a, b = self._interval(s, y, names)
        logA = a + (b - a) * jax.nn.sigmoid(u)
        A = jnp.exp(logA)
        log_du = jnp.log(b - a) + jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u)
        return A, s / A, y - A, logA, log_du

    def to_theta(self, w):
        """θ (…, p) from w (…, p); JAX-traceable."""
        import jax.numpy as jnp

        parts = []
        for k, names in enumerate(self.blocks):
            A, e, o, _, _ = self._block((w[..., 3 * k], w[..., 3 * k + 1], w[..., 3 * k + 2]), names)
            parts += [A, e, o]
        if self.mode == "laminar_flow":
            parts.append(w[..., 6])
        return jnp.stack(parts, axis=-1)

    def from_theta(self, theta, margin: float = 0.02) -> np.ndarray:
        """w of θ (p,), moved inside the bounds (by ``margin`` of each interval).

        An amplitude on its bound (D0 = 1e5 is a common least-squares answer when D0
        and D_offset are not separately determined) becomes one inside; s and y are
        kept, so J(t) changes only at second order.
        """
        th = dict(zip(self.names, np.asarray(theta, float)))
        w = []
        for amp, exponent, offset in self.blocks:
            e_lo, e_hi = self._b(exponent)
            o_lo, o_hi = self._b(offset)
            A = th[amp]
            e = float(np.clip(th[exponent], e_lo + margin * (e_hi - e_lo), e_hi - margin * (e_hi - e_lo)))
            s = e * A
            y = A + float(np.clip(th[offset], o_lo + margin * (o_hi - o_lo), o_hi - margin * (o_hi - o_lo)))
            a, b = (float(v) for v in self._interval(s, y, (amp, exponent, offset)))
            x = np.clip((np.log(max(A, 1e-300)) - a) / (b - a), margin, 1 - margin)
            w += [_logit(x), s, y]
        if self.mode == "laminar_flow":
            lo, hi = self._b("phi0")
            w.append(float(np.clip(th["phi0"], lo + margin * (hi - lo), hi - margin * (hi - lo))))
        return np.asarray(w, float)

    def prior_scales(self) -> dict:
        """Centre and sd of the Normal prior of each sampling coordinate (see log_prior)."""
        out = {}
        for k, (amp, exponent, offset) in enumerate(self.blocks):
            a_lo, a_hi = self._b(amp)
            e_lo, e_hi = self._b(exponent)
            o_lo, o_hi = self._b(offset)
            names = self.w_names[3 * k: 3 * k + 3]
            out[names[0]] = (0.0, PRIOR_SD)
            out[names[1]] = (0.0, max(-e_lo, e_hi) * a_hi)
            out[names[2]] = (0.5 * (a_lo + a_hi + o_lo + o_hi), 0.5 * (a_hi - a_lo + o_hi - o_lo))
        return out

    def log_prior(self, w):
        """log prior density of w (untempered); JAX.

        Independent Normals on the sampling coordinates: u ~ N(0, 1) (the position of
        log A in its allowed interval, on the logit scale), s ~ N(0, (|e|max·A_hi)²)
        (the largest slope the bounds allow), y ~ N(centre, half-range²) of A + o;
        times a logit-normal factor (logit sd 1) for each exponent e = s/A on its
        bounds, which keeps the exponents away from their bounds where the data say
        nothing about them (the early-time tail of J(t)); phi0 logit-normal (logit sd
        1) on its bounds; zero outside the bounds (A, and the offset for any u, stay
        inside theirs by construction).
        """
        import jax.numpy as jnp

        lp = 0.0
        scales = self.prior_scales()
        for name, (c, sd) in scales.items():
            i = self.w_names.index(name)
            lp = lp + _normal_logpdf(w[..., i] - c, sd)
        for k, names in enumerate(self.blocks):
            A, e, o, _, _ = self._block((w[..., 3 * k], w[..., 3 * k + 1], w[..., 3 * k + 2]), names)
            o_lo, o_hi = self._b(names[2])
            a_lo, a_hi = self._b(names[0])
            lp = lp + jnp.where((o > o_lo) & (o < o_hi) & (A <= a_hi), 0.0, -jnp.inf)
            lp = lp + _logit_normal(e, *self._b(names[1]))
        if self.mode == "laminar_flow":
            lp = lp + _logit_normal(w[..., 6], *self._b("phi0"))
        return lp


def _logit_normal(value, lo, hi):
    """log density of a logit-normal variable on (lo, hi) (logit sd PRIOR_SD); -inf outside."""
    import jax.numpy as jnp

    x = (value - lo) / (hi - lo)
    ok = (x > 0) & (x < 1)
    xs = jnp.where(ok, x, 0.5)  # safe value: no NaN reaches the gradient
    v = jnp.log(xs) - jnp.log1p(-xs)
    lp = _normal_logpdf(v, PRIOR_SD) - jnp.log(xs) - jnp.log1p(-xs) - np.log(hi - lo)
    return jnp.where(ok, lp, -jnp.inf)


def _sigmoid(v):
    import jax

    return jax.nn.sigmoid(v)


def _logit(x):
    return float(np.log(x) - np.log1p(-x))


def _normal_logpdf(v, sd):
    return -0.5 * (v / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))


# ---------------------------------------------------------------- data and likelihood


@dataclass
class ShardData:
    """The points one shard conditions on, grouped by q.

    Attributes
    ----------
    groups : list of dict
        Per q: ``q`` (1/Å), ``phi`` (n_phi,) deg, ``t1``, ``t2`` (n,) s with t2 > t1,
        ``yc`` (n_phi, n) c2 minus its per-bin mean, ``bins`` (n_phi,) global bin index.
    n : ndarray (n_bins,)
        Points per bin.
    syy : ndarray (n_bins,)
        Σ yc² per bin.
    """

    groups: list
    n: np.ndarray
    syy: np.ndarray

    @property
    def n_points(self) -> int:
        return int(self.n.sum())


def tile_lattice(tile, thin: int) -> dict:
    """Worker task: the points of one tile on the lattice of every ``thin``-th frame.

    Rows and columns whose dataset index (frame - first frame) is a multiple of ``thin``
    are kept, fitted points only (t2 > t1).

    Parameters
    ----------
    tile : :class:`~xpcsfit.engine.tiles.TileSpec` (loaded here) or :class:`~xpcsfit.engine.kernel.Tile`
    thin : int

    Returns
    -------
    dict: ``q_pos``, ``q``, ``phi`` (n_phi,), ``bin_start``, ``i``, ``j`` (n,) lattice
    row and column (dataset index // thin), ``t1``, ``t2`` (n,) s, ``y`` (n_phi, n)
    float32 c2.
    """
    if hasattr(tile, "load"):
        tile = tile.load()
    size = tile.weight.shape[0]
    rows = np.flatnonzero((tile.start[0] + np.arange(size)) % thin == 0)
    cols = np.flatnonzero((tile.start[1] + np.arange(size)) % thin == 0)
    i, j = np.nonzero(tile.weight[np.ix_(rows, cols)] > 0)
    i, j = rows[i], cols[j]
    return {
        "q_pos": int(tile.index[0]), "q": float(tile.q), "phi": np.asarray(tile.phi, float),
        "bin_start": int(tile.bin_start),
        "i": (tile.start[0] + i) // thin, "j": (tile.start[1] + j) // thin,
        "t1": tile.t1[i], "t2": tile.t2[j], "y": tile.c2[:, i, j],
    }


def shard_of(i, j, n_shards: int) -> np.ndarray:
    """Shard of lattice points (i, j): a fixed integer hash (splitmix64) modulo K.

    Every shard thus gets about 1/K of the points of every row, column, lag and bin,
    interleaved at random over the whole map, like the random data partition of
    Scott et al. (2016); the same point always goes to the same shard.
    """
    with np.errstate(over="ignore"):
        z = (np.asarray(i, np.uint64) << np.uint64(32)) ^ np.asarray(j, np.uint64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n_shards)).astype(np.int64)


def shard_data(pieces, index: int, n_shards: int, n_bins: int) -> ShardData:
    """Collect shard ``index``'s points (see :func:`shard_of`) from per-tile lattices.

    Parameters
    ----------
    pieces : list of dict
        From :func:`tile_lattice`.
    index, n_shards : int
    n_bins : int
        Bins of the whole fit (n_q · n_phi).
    """
    by_q: dict[int, list] = {}
    for piece in pieces:
        keep = shard_of(piece["i"], piece["j"], n_shards) == index
        if keep.any():
            by_q.setdefault(piece["q_pos"], []).append(
                (piece, piece["t1"][keep], piece["t2"][keep], piece["y"][:, keep]))
    groups = []
    n = np.zeros(n_bins)
    syy = np.zeros(n_bins)
    for iq in sorted(by_q):
        parts = by_q[iq]
        first = parts[0][0]
        y = np.concatenate([p[3] for p in parts], axis=1).astype(float)
        bins = first["bin_start"] + np.arange(y.shape[0])
        yc = y - y.mean(axis=1, keepdims=True)
        n[bins] = y.shape[1]
        syy[bins] = (yc * yc).sum(axis=1)
        t1 = np.concatenate([p[1] for p in parts])
        t2 = np.concatenate([p[2] for p in parts])
        groups.append(dict(q=first["q"], phi=first["phi"], t1=t1, t2=t2, yc=yc, bins=bins))
    return ShardData(groups=groups, n=n, syy=syy)


def pair_g1_squared(theta, mode, q, L, phi, t1, t2):
    """G = g1² at point pairs (t1[i], t2[i]) for every angle: (n_phi, n) (static: (1, n)).

    The same physics as :func:`xpcsfit.model.g1_squared`, on a list of points instead of
    a grid (a thinned shard is not a grid).
    """
    import jax.numpy as jnp

    lt1, lt2 = jnp.log(t1), jnp.log(t2)
    integral = _model.diffusion_integral(theta[0], theta[1], theta[2], t1, t2, lt1, lt2)
    E = jnp.exp(-(q * q) * integral)[None]
    if mode == "static":
        return E
    strain = _model.shear_integral(theta[3], theta[4], theta[5], t1, t2, lt1, lt2)
    cosine = jnp.cos(jnp.deg2rad(theta[6] - phi))[:, None]
    S = jnp.sinc(0.5 * q * L * cosine * strain[None] / jnp.pi)
    return E * S * S


def log_likelihood(theta, data: ShardData, var: np.ndarray, mode: str, L: float):
    """Σ over bins of the contrast/offset-marginal Gaussian log likelihood (JAX).

    Parameters
    ----------
    theta : array (p,)
    data : ShardData
    var : ndarray (n_bins,)
        Noise variance per bin (c2 units²).
    """
    import jax.numpy as jnp

    total = 0.0
    for g in data.groups:
        G = jnp.broadcast_to(pair_g1_squared(theta, mode, g["q"], L, g["phi"], g["t1"], g["t2"]),
                             g["yc"].shape)
        b = g["bins"]
        n = data.n[b]
        sg = G.sum(axis=1)
        sgg = jnp.maximum((G * G).sum(axis=1) - sg * sg / n, 1e-300)
        syg = (g["yc"] * G).sum(axis=1)
        rss = data.syy[b] - syg * syg / sgg
        total = total + jnp.sum(-0.5 * rss / var[b] - 0.5 * jnp.log(sgg))
    return total


# ---------------------------------------------------------------- the shard task


@dataclass(frozen=True)
class ShardSpec:
    """Everything a shard task needs besides its tiles (small; pickled to the worker)."""

    index: int
    name: str
    n_shards: int
    coords: Coordinates
    L: float
    var: np.ndarray  # (n_bins,)
    n_bins: int
    w_start: np.ndarray  # (p,) from the least-squares fit
    warmup: int
    samples: int
    chains: int
    seed: int
    target_accept: float = 0.9


def log_target(w, spec: ShardSpec, data: ShardData):
    """The shard's log density of w: prior^(1/K) times the shard likelihood."""
    theta = spec.coords.to_theta(w)
    return spec.coords.log_prior(w) / spec.n_shards + log_likelihood(
        theta, data, spec.var, spec.coords.mode, spec.L)


def _standardisation(spec: ShardSpec, data: ShardData):
    """Centre, scale and correlation of w from the Hessian of the log target at w_start.

    NUTS samples z = (w - centre)/scale, so that the mass-matrix regularisation (towards
    the identity) and the first step sizes see unit scales; the correlation matrix is
    the initial inverse mass matrix.
    """
    import jax

    w0 = np.asarray(spec.w_start, float)
    H = -np.asarray(jax.hessian(lambda w: log_target(w, spec, data))(w0))
    p = w0.size
    fallback = np.maximum(np.abs(w0) * 0.1, 1e-12)
    fallback[0] = PRIOR_SD * np.sqrt(spec.n_shards)
    if spec.coords.mode == "laminar_flow":
        fallback[3] = fallback[0]
    corr = np.eye(p)
    scale = fallback
    if np.all(np.isfinite(H)):
        H = 0.5 * (H + H.T)
        d = np.sqrt(np.abs(np.diag(H)))
        d = np.where(d > 0, d, 1.0 / fallback)
        Hs = H / np.outer(d, d)
        evals, evecs = np.linalg.eigh(Hs)
        if evals.max() > 0:
            # Directions the data do not curve (or curve the wrong way at a start that
            # is not the shard's mode) get the largest curvature's 1e-6: wide, not infinite.
            evals = np.maximum(evals, 1e-6 * evals.max())
            cov = (evecs / evals) @ evecs.T / np.outer(d, d)
            sd = np.sqrt(np.diag(cov))
            ok = np.isfinite(sd) & (sd > 0)
            scale = np.where(ok, sd, fallback)
            corr = cov / np.outer(scale, scale)
            corr = 0.5 * (corr + corr.T) + 1e-9 * np.eye(p)
    return w0, scale, corr


def _starts(spec, data, centre, scale, corr) -> np.ndarray:
    """Over-dispersed starts, one per chain: ~1 posterior sd around the least-squares
    point (so that R-hat can see chains that have not met), pulled in until the log
    target is finite there."""
    import jax

    f = jax.jit(lambda w: log_target(w, spec, data))
    rng = np.random.default_rng([spec.seed, spec.index])
    chol = np.linalg.cholesky(corr)
    out = []
    for _ in range(spec.chains):
        z = rng.normal(0.0, 1.0, size=corr.shape[0]) @ chol.T
        for _ in range(30):
            if np.isfinite(float(f(centre + scale * z))):
                break
            z = 0.5 * z
        out.append(z)
    return np.asarray(out)


def run_shard(spec: ShardSpec, pieces) -> dict:
    """Worker task: NUTS on one shard; returns its draws and sampler statistics.

    Parameters
    ----------
    spec : ShardSpec
    pieces : list of dict
        Lattice points of every tile (:func:`tile_lattice`); the shard keeps its own
        (:func:`shard_of`), each with all its phi (angle-complete).

    Returns
    -------
    dict with ``w`` and ``theta`` (chains, samples, p), ``diverging`` (chains, samples),
    ``num_steps`` (chains, samples), step size, points, worker, wall time.
    """
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    data = shard_data(pieces, spec.index, spec.n_shards, spec.n_bins)
    p = len(spec.coords.names)
    centre, scale, corr = _standardisation(spec, data)
    centre_j, scale_j = jnp.asarray(centre), jnp.asarray(scale)

    def model():
        z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), event_shape=(p,)))
        numpyro.factor("log_target", log_target(centre_j + scale_j * z, spec, data))

    z0 = _starts(spec, data, centre, scale, corr)
    kernel = NUTS(model, dense_mass=True, inverse_mass_matrix={("z",): jnp.asarray(corr)},
                  target_accept_prob=spec.target_accept, max_tree_depth=10)
    mcmc = MCMC(kernel, num_warmup=spec.warmup, num_samples=spec.samples, num_chains=spec.chains,
                chain_method="sequential", progress_bar=False)
    key = jax.random.PRNGKey(np.uint32(spec.seed * 100_003 + spec.index))
    init = {"z": jnp.asarray(z0 if spec.chains > 1 else z0[0])}
    mcmc.run(key, init_params=init, extra_fields=("diverging", "num_steps", "adapt_state.step_size"))
    z = np.asarray(mcmc.get_samples(group_by_chain=True)["z"]).reshape(spec.chains, spec.samples, p)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    w = centre + scale * z
    theta = np.asarray(jax.vmap(spec.coords.to_theta)(jnp.asarray(w.reshape(-1, p)))).reshape(w.shape)
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        worker = "local"
    return {
        "index": spec.index,
        "name": spec.name,
        "w": w,
        "theta": theta,
        "diverging": np.asarray(extra["diverging"]).reshape(spec.chains, spec.samples),
        "num_steps": np.asarray(extra["num_steps"]).reshape(spec.chains, spec.samples),
        "step_size": np.asarray(extra["adapt_state.step_size"]).reshape(spec.chains, spec.samples)[:, -1],
        "n_points": data.n_points,
        "worker": worker,
        "wall_time_s": time.perf_counter() - started,
    }
