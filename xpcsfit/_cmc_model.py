"""One Consensus Monte Carlo shard: sampling coordinates, tempered prior, likelihood, NUTS.

Sampling coordinates w
    With alpha ≈ 0 the data fix J(t) = D0 t**alpha + D_offset over the window but not
    D0, alpha and D_offset separately: in (D0, alpha) the posterior is a thin curved
    ridge (D0·alpha ≈ const) that NUTS cannot cross. NUTS therefore samples

        w = (v_D0, s_J, J_1 [, v_g0, s_g, g_1, phi0])

    with D0 = exp(log lo + (log hi - log lo)·sigmoid(v_D0)), s_J = alpha·D0 = dJ/dln t
    and J_1 = D0 + D_offset = J at t = 1 s; likewise for the shear rate
    (gamma_dot_t0, beta, gamma_dot_t_offset) -> (v_g0, s_g, g_1). The data determine
    (s_J, J_1) whatever D0 is, so the ridge becomes a straight valley along v_D0.

Prior (weakly informative, inside the bounds)
    Each physics parameter independently logit-normal on its bounds: the bound-scaled
    value (log-scaled for D0 and gamma_dot_t0) is sigmoid(v), v ~ Normal(0, 1.5²). The
    density is flat-topped over the middle of the interval and falls smoothly to zero
    at the bounds, so the bounds are smooth barriers rather than walls that NUTS
    would report as divergences. The prior density of w (Jacobian 1/D0 · 1/gamma_dot_t0
    included) is raised to 1/K in each of the K shards (Scott et al., 2016, Eq. 2), in
    w, the space where the shards are combined: the product of the K shard targets is
    then exactly the full posterior of w.

Likelihood
    c2 = offset_k + contrast_k·G(θ) + e with e ~ Normal(0, var_k), one var_k per (q, phi)
    bin, fixed: the least-squares residual variance times an inflation factor for the
    correlated noise (see ``_cmc_noise``). contrast_k and offset_k enter linearly and
    are integrated out analytically under a flat prior; per bin this leaves

        log L_k(θ) = -RSS_k(θ) / (2 var_k) - ½ log det M_k(θ) + const,

    RSS_k the residual sum of squares at the best contrast/offset for this θ and M_k
    the 2×2 Gram matrix of [G, 1]. Marginalising per shard gives each shard its own
    contrast/offset; shards spread over the whole time window have nearly the same
    θ-information about them, so the loss against shared values is second order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import _model  # noqa: F401  (jax_enable_x64 before any array is made)

PRIOR_SD = 1.5  # sd of the logit coordinate of every physics parameter
_LOG_SCALED = ("D0", "gamma_dot_t0")


# ---------------------------------------------------------------- coordinates, prior


@dataclass(frozen=True)
class Coordinates:
    """Map between physics parameters θ and NUTS's sampling coordinates w.

    Parameters
    ----------
    mode : {"static", "laminar_flow"}
    names : tuple of str
        Physics parameter names in θ order (``_parameters.MODES[mode]``).
    lower, upper : tuple of float
        Bounds of each physics parameter (same order); D0 and gamma_dot_t0 need
        lower > 0.
    """

    mode: str
    names: tuple
    lower: tuple
    upper: tuple

    @property
    def w_names(self) -> list[str]:
        out = ["logit_D0", "dJ_dlnt_at_1s", "J_at_1s"]
        if self.mode == "laminar_flow":
            out += ["logit_gamma_dot_t0", "dgamma_dot_dlnt_at_1s", "gamma_dot_at_1s", "phi0"]
        return out

    def _b(self, name):
        i = self.names.index(name)
        return self.lower[i], self.upper[i]

    def _amplitude(self, v, name):
        import jax.numpy as jnp

        lo, hi = self._b(name)
        llo, lhi = np.log(lo), np.log(hi)
        return jnp.exp(llo + (lhi - llo) * _sigmoid(v))

    def to_theta(self, w):
        """θ (…, p) from w (…, p); JAX-traceable."""
        import jax.numpy as jnp

        D0 = self._amplitude(w[..., 0], "D0")
        parts = [D0, w[..., 1] / D0, w[..., 2] - D0]
        if self.mode == "laminar_flow":
            g0 = self._amplitude(w[..., 3], "gamma_dot_t0")
            parts += [g0, w[..., 4] / g0, w[..., 5] - g0, w[..., 6]]
        return jnp.stack(parts, axis=-1)

    def from_theta(self, theta, margin: float = 0.02) -> np.ndarray:
        """w of θ (p,), first moved ``margin`` (bound-scaled) inside every bound.

        An amplitude on its bound (D0 = 1e5 is a common least-squares answer when D0
        and D_offset are not separately determined) becomes one inside; s and J_1 are
        kept, so J(t) changes only at second order.
        """
        th = dict(zip(self.names, np.asarray(theta, float)))

        def inside(name, value, log=False):
            lo, hi = self._b(name)
            if log:
                lo, hi, value = np.log(lo), np.log(hi), np.log(max(value, lo))
            x = np.clip((value - lo) / (hi - lo), margin, 1 - margin)
            return lo + x * (hi - lo), x

        def amp_block(a, e, o):
            a_val, x = inside(a, th[a], log=True)
            amp = np.exp(a_val)
            exponent, _ = inside(e, th[e])
            offset, _ = inside(o, th[o])
            J1 = th[a] + th[o]  # J(1 s) of the least-squares point, kept
            s = th[e] * th[a]
            if not (self._b(o)[0] < J1 - amp < self._b(o)[1]):
                J1 = amp + offset
            if not (self._b(e)[0] < s / amp < self._b(e)[1]):
                s = exponent * amp
            return [_logit(x), s, J1]

        w = amp_block("D0", "alpha", "D_offset")
        if self.mode == "laminar_flow":
            w += amp_block("gamma_dot_t0", "beta", "gamma_dot_t_offset")
            w.append(inside("phi0", th["phi0"])[0])
        return np.asarray(w, float)

    def log_prior(self, w):
        """log density of w under the prior (Jacobian included), untempered; JAX."""
        import jax.numpy as jnp

        theta = self.to_theta(w)
        lp = _normal_logpdf(w[..., 0], PRIOR_SD) - jnp.log(theta[..., 0])
        lp = lp + self._logit_normal(theta[..., 1], "alpha") + self._logit_normal(theta[..., 2], "D_offset")
        if self.mode == "laminar_flow":
            lp = lp + _normal_logpdf(w[..., 3], PRIOR_SD) - jnp.log(theta[..., 3])
            for i, name in ((4, "beta"), (5, "gamma_dot_t_offset"), (6, "phi0")):
                lp = lp + self._logit_normal(theta[..., i], name)
        return lp

    def _logit_normal(self, value, name):
        import jax.numpy as jnp

        lo, hi = self._b(name)
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


def shard_data(tiles, thin: int, n_bins: int) -> ShardData:
    """Collect the points of ``tiles`` on the lattice of every ``thin``-th frame.

    Rows and columns whose dataset frame index is a multiple of ``thin`` are kept
    (tile edges are multiples of ``thin``), fitted points only (t2 > t1).
    """
    by_q: dict[float, list] = {}
    for tile in tiles:
        w = tile.weight[::thin, ::thin] > 0
        i, j = np.nonzero(w)
        if i.size == 0:
            continue
        by_q.setdefault(tile.index[0], []).append(
            (tile, tile.t1[::thin][i], tile.t2[::thin][j], tile.c2[:, ::thin, ::thin][:, i, j])
        )
    groups = []
    n = np.zeros(n_bins)
    syy = np.zeros(n_bins)
    for iq in sorted(by_q):
        parts = by_q[iq]
        tile = parts[0][0]
        y = np.concatenate([p[3] for p in parts], axis=1).astype(float)
        bins = tile.bin_start + np.arange(y.shape[0])
        yc = y - y.mean(axis=1, keepdims=True)
        n[bins] = y.shape[1]
        syy[bins] = (yc * yc).sum(axis=1)
        t1 = np.concatenate([p[1] for p in parts])
        t2 = np.concatenate([p[2] for p in parts])
        groups.append(dict(q=float(tile.q), phi=np.asarray(tile.phi, float), t1=t1, t2=t2,
                           yc=yc, bins=bins))
    return ShardData(groups=groups, n=n, syy=syy)


def pair_g1_squared(theta, mode, q, L, phi, t1, t2):
    """G = g1² at point pairs (t1[i], t2[i]) for every angle: (n_phi, n) (static: (1, n)).

    The same physics as :func:`xpcsfit._model.g1_squared`, on a list of points instead of
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
    thin: int
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


def run_shard(spec: ShardSpec, tiles) -> dict:
    """Worker task: NUTS on one shard; returns its draws and sampler statistics.

    Parameters
    ----------
    spec : ShardSpec
    tiles : list of :class:`~xpcsfit._kernel.Tile`
        The shard's tiles (angle-complete: each holds every phi of its q).

    Returns
    -------
    dict with ``w`` and ``theta`` (chains, samples, p), ``diverging`` (chains, samples),
    ``num_steps`` (chains, samples), step size, points, tiles, worker, wall time.
    """
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    data = shard_data(tiles, spec.thin, spec.n_bins)
    p = len(spec.coords.names)
    centre, scale, corr = _standardisation(spec, data)
    centre_j, scale_j = jnp.asarray(centre), jnp.asarray(scale)

    def model():
        z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), event_shape=(p,)))
        numpyro.factor("log_target", log_target(centre_j + scale_j * z, spec, data))

    rng = np.random.default_rng([spec.seed, spec.index])
    # Over-dispersed starts (±1 posterior sd around the least-squares point), so that
    # R-hat can see chains that have not met.
    z0 = rng.normal(0.0, 1.0, size=(spec.chains, p)) @ np.linalg.cholesky(corr).T
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
        "n_tiles": len(tiles),
        "tiles": [tuple(int(v) for v in t.index) for t in tiles],
        "worker": worker,
        "wall_time_s": time.perf_counter() - started,
    }
