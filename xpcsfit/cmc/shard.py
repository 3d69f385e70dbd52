"""One Consensus Monte Carlo shard: its points, and the NUTS job that samples it.

Every tile's points on the lattice of every ``thin``-th frame (:func:`tile_lattice`) are
dealt to the K shards by a fixed hash of their frame pair (:func:`shard_of`); a shard's
points (:func:`shard_data`) carry all phi of their q (angle-complete). :func:`run_shard`
is one NumPyro NUTS task on them, sampling the coordinates of
:mod:`xpcsfit.cmc.coordinates` with the target prior^(1/K) × likelihood
(:mod:`xpcsfit.cmc.likelihood`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from xpcsfit.cmc.coordinates import PRIOR_SD, Coordinates
from xpcsfit.cmc.likelihood import ShardData, log_likelihood
from xpcsfit.model import enable_float64

# Chains one after the other in the shard's task. On a CPU worker numpyro's
# chain_method="vectorized" costs more than the chains in turn: one vmapped gradient of
# 4 chains on flow_small's shard took 22.6 ms against 4 × 3.7 ms, and every leapfrog
# step of the vectorised chains waits for the longest tree of all of them.
CHAIN_METHOD = "sequential"


@dataclass(frozen=True)
class SamplerSettings:
    """NUTS settings, the same for every shard.

    Attributes
    ----------
    warmup, samples, chains : int
        Warm-up iterations, kept draws per chain, chains per shard (>= 1 each).
    seed : int
        >= 0; shard k's chains use (seed, k).
    target_accept : float
        NUTS's target acceptance probability, 0 < value < 1.
    """

    warmup: int
    samples: int
    chains: int
    seed: int
    target_accept: float = 0.9


@dataclass(frozen=True)
class ShardSpec:
    """Everything a shard task needs besides its points (small; pickled to the worker).

    Attributes
    ----------
    index, n_shards : int
        k and K.
    name : str
    coords : Coordinates
    L : float
        Gap, Å.
    var : ndarray (n_bins,)
        Noise variance per bin (c2 units²), inflation included.
    w_start : ndarray (p,)
        Sampling coordinates of the least-squares fit.
    sampler : SamplerSettings
    """

    index: int
    name: str
    n_shards: int
    coords: Coordinates
    L: float
    var: np.ndarray
    w_start: np.ndarray
    sampler: SamplerSettings


def tile_lattice(tile, thin: int) -> dict:
    """Worker task: the points of one tile on the lattice of every ``thin``-th frame.

    Rows and columns whose dataset index (frame - first frame) is a multiple of ``thin``
    are kept, fitted points only (t2 > t1).

    Parameters
    ----------
    tile : :class:`~xpcsfit.engine.kernel.Tile`
    thin : int

    Returns
    -------
    dict: ``q_pos``, ``q``, ``phi`` (n_phi,), ``bin_start``, ``i``, ``j`` (n,) lattice
    row and column (dataset index // thin), ``t1``, ``t2`` (n,) s, ``y`` (n_phi, n)
    float32 c2.
    """
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
        kept = by_q[iq]
        first = kept[0][0]
        y = np.concatenate([p[3] for p in kept], axis=1).astype(float)
        bins = first["bin_start"] + np.arange(y.shape[0])
        yc = y - y.mean(axis=1, keepdims=True)
        n[bins] = y.shape[1]
        syy[bins] = (yc * yc).sum(axis=1)
        t1 = np.concatenate([p[1] for p in kept])
        t2 = np.concatenate([p[2] for p in kept])
        groups.append(dict(q=first["q"], phi=first["phi"], t1=t1, t2=t2, yc=yc, bins=bins))
    return ShardData(groups=groups, n=n, syy=syy)


def log_target(w, spec: ShardSpec, data: ShardData):
    """The shard's log density of w: prior^(1/K) times the shard likelihood."""
    theta = spec.coords.to_theta(w)
    return spec.coords.log_prior(w, theta) / spec.n_shards + log_likelihood(
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
    rng = np.random.default_rng([spec.sampler.seed, spec.index])
    chol = np.linalg.cholesky(corr)
    out = []
    for _ in range(spec.sampler.chains):
        z = rng.normal(0.0, 1.0, size=corr.shape[0]) @ chol.T
        for _ in range(30):
            if np.isfinite(float(f(centre + scale * z))):
                break
            z = 0.5 * z
        out.append(z)
    return np.asarray(out)


def run_shard(spec: ShardSpec, data: ShardData) -> dict:
    """Worker task: NUTS on one shard; returns its draws and sampler statistics.

    Parameters
    ----------
    spec : ShardSpec
    data : ShardData
        The shard's points (:func:`shard_data`), each with all its phi (angle-complete).

    Returns
    -------
    dict with ``w`` and ``theta`` (chains, samples, p), ``diverging`` (chains, samples),
    ``num_steps`` (chains, samples), ``step_size`` (chains,), ``n_points``, ``worker``,
    ``wall_time_s``.
    """
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.infer import MCMC, NUTS

    enable_float64()  # the task may run on a worker without xpcsfit's preload
    nuts = spec.sampler
    p = len(spec.coords.names)
    centre, scale, corr = _standardisation(spec, data)
    centre_j, scale_j = jnp.asarray(centre), jnp.asarray(scale)

    def model():
        z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), event_shape=(p,)))
        numpyro.factor("log_target", log_target(centre_j + scale_j * z, spec, data))

    z0 = _starts(spec, data, centre, scale, corr)
    kernel = NUTS(model, dense_mass=True, inverse_mass_matrix={("z",): jnp.asarray(corr)},
                  target_accept_prob=nuts.target_accept, max_tree_depth=10)
    mcmc = MCMC(kernel, num_warmup=nuts.warmup, num_samples=nuts.samples, num_chains=nuts.chains,
                chain_method=CHAIN_METHOD, progress_bar=False)
    key = jax.random.PRNGKey(np.uint32(nuts.seed * 100_003 + spec.index))
    init = {"z": jnp.asarray(z0 if nuts.chains > 1 else z0[0])}
    mcmc.run(key, init_params=init, extra_fields=("diverging", "num_steps", "adapt_state.step_size"))
    shape = (nuts.chains, nuts.samples)
    z = np.asarray(mcmc.get_samples(group_by_chain=True)["z"]).reshape(*shape, p)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    w = centre + scale * z
    theta = np.asarray(jax.vmap(spec.coords.to_theta)(jnp.asarray(w.reshape(-1, p)))).reshape(w.shape)
    return {
        "index": spec.index,
        "name": spec.name,
        "w": w,
        "theta": theta,
        "diverging": np.asarray(extra["diverging"]).reshape(shape),
        "num_steps": np.asarray(extra["num_steps"]).reshape(shape),
        "step_size": np.asarray(extra["adapt_state.step_size"]).reshape(shape)[:, -1],
        "n_points": data.n_points,
        "worker": _worker_address(),
        "wall_time_s": time.perf_counter() - started,
    }


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"
