"""One Consensus Monte Carlo shard: its points, and the NUTS job that samples it.

Every tile's points on the lattice of every ``thin``-th frame (:func:`tile_lattice`) are
dealt to the K shards by a fixed hash of their frame pair (:func:`shard_of`); a shard's
points (:func:`shard_data`) carry all phi of their q (angle-complete). :func:`run_shard`
is one NumPyro NUTS task on them, sampling the coordinates of
:mod:`xpcsfit.cmc.coordinates` with the target prior^(1/K) × likelihood
(:mod:`xpcsfit.cmc.likelihood`).
"""

from __future__ import annotations

import functools
import threading
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
        groups.append(dict(q=first["q"], phi=first["phi"], t1=t1, t2=t2, yc=yc, bins=bins, mask=np.ones(t1.size)))
    return ShardData(groups=groups, n=n, syy=syy)


def log_target(w, data: ShardData, var, coords: Coordinates, L: float, n_shards: int):
    """The shard's log density of w (p,): prior^(1/K) times the shard likelihood (JAX).

    ``var`` (n_bins,) noise variance per bin, ``L`` the gap in Å, ``n_shards`` K; the
    prior is :meth:`Coordinates.log_prior`, the likelihood
    :func:`~xpcsfit.cmc.likelihood.log_likelihood`.
    """
    theta = coords.to_theta(w)
    return coords.log_prior(w, theta) / n_shards + log_likelihood(theta, data, var, coords.mode, L)


@functools.lru_cache(maxsize=8)
def _compiled(coords: Coordinates, L: float, n_shards: int):
    """The jitted log target, its Hessian and the map to θ of one run's shards.

    Cached per worker process: the shards of a run share these static settings and
    (padded, :func:`~xpcsfit.cmc.likelihood.pad_to_common_shapes`) their array shapes,
    so the second shard on a worker compiles nothing.
    """
    import jax

    target = functools.partial(log_target, coords=coords, L=L, n_shards=n_shards)
    return {"value": jax.jit(target), "hessian": jax.jit(jax.hessian(target)),
            "theta": jax.jit(jax.vmap(coords.to_theta))}


@functools.lru_cache(maxsize=8)
def _sampler(coords: Coordinates, L: float, n_shards: int, settings: SamplerSettings, thread: int):
    """numpyro MCMC (NUTS, dense mass matrix) of one run's shards, whose model takes the
    shard as arguments (``jit_model_args``): compiled once per worker thread and reused
    by every shard of the same shapes. z are the whitened coordinates w = centre + T·z."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.infer import MCMC, NUTS

    p = len(coords.names)

    def model(centre, T, data, var):
        z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), event_shape=(p,)))
        numpyro.factor("log_target", log_target(centre + T @ z, data, var, coords, L, n_shards))

    kernel = NUTS(model, dense_mass=True, target_accept_prob=settings.target_accept, max_tree_depth=10)
    return MCMC(kernel, num_warmup=settings.warmup, num_samples=settings.samples, num_chains=settings.chains,
                chain_method=CHAIN_METHOD, progress_bar=False, jit_model_args=True)


def _whitening(spec: ShardSpec, data: ShardData):
    """Centre and whitening matrix of w from the Hessian of the log target at w_start.

    NUTS samples z with w = centre + T·z, T T^T the Laplace covariance, so that the
    mass-matrix adaptation (regularised towards the identity) and the first step sizes
    see unit scales and no correlation.
    """
    import jax.numpy as jnp

    f = _compiled(spec.coords, spec.L, spec.n_shards)
    w0 = np.asarray(spec.w_start, float)
    H = -np.asarray(f["hessian"](jnp.asarray(w0), data, jnp.asarray(spec.var)))
    p = w0.size
    fallback = np.maximum(np.abs(w0) * 0.1, 1e-12)
    fallback[0] = PRIOR_SD * np.sqrt(spec.n_shards)
    if spec.coords.mode == "laminar_flow":
        fallback[3] = fallback[0]
    cov = np.diag(fallback ** 2)
    if np.all(np.isfinite(H)):
        H = 0.5 * (H + H.T)
        d = np.sqrt(np.abs(np.diag(H)))
        d = np.where(d > 0, d, 1.0 / fallback)
        evals, evecs = np.linalg.eigh(H / np.outer(d, d))
        if evals.max() > 0:
            # Directions the data do not curve (or curve the wrong way at a start that
            # is not the shard's mode) get the largest curvature's 1e-6: wide, not infinite.
            evals = np.maximum(evals, 1e-6 * evals.max())
            laplace = (evecs / evals) @ evecs.T / np.outer(d, d)
            sd = np.sqrt(np.diag(laplace))
            if np.all(np.isfinite(sd) & (sd > 0)):
                cov = laplace
    cov = 0.5 * (cov + cov.T)
    sd = np.sqrt(np.diag(cov))
    return w0, np.linalg.cholesky(cov / np.outer(sd, sd) + 1e-9 * np.eye(p)) * sd[:, None]


def laplace_sd(spec: ShardSpec, data: ShardData) -> np.ndarray:
    """sd (p,) of each sampling coordinate under the Laplace approximation of the shard's
    target at ``spec.w_start`` (the covariance NUTS is whitened with, :func:`_whitening`)."""
    _, T = _whitening(spec, data)
    return np.sqrt((T * T).sum(axis=1))


def _starts(spec, data, centre, T) -> np.ndarray:
    """Over-dispersed starts in z, one per chain: ~1 posterior sd around the
    least-squares point (so that R-hat can see chains that have not met), pulled in
    until the log target is finite there."""
    import jax.numpy as jnp

    f = _compiled(spec.coords, spec.L, spec.n_shards)["value"]
    var = jnp.asarray(spec.var)
    rng = np.random.default_rng([spec.sampler.seed, spec.index])
    out = []
    for _ in range(spec.sampler.chains):
        z = rng.normal(0.0, 1.0, size=centre.size)
        for _ in range(30):
            if np.isfinite(float(f(jnp.asarray(centre + T @ z), data, var))):
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
    import numpyro.infer  # noqa: F401  before anything is compiled: see below

    # Importing numpyro registers JAX settings that are part of every jit cache key; done
    # after the first compilation, it made every function of the first shard on a worker
    # compile twice (measured: +9 s for the Hessian, +14 s for NUTS on flow_small).
    enable_float64()  # the task may run on a worker without xpcsfit's preload
    nuts = spec.sampler
    p = len(spec.coords.names)
    centre, T = _whitening(spec, data)
    z0 = _starts(spec, data, centre, T)
    mcmc = _sampler(spec.coords, spec.L, spec.n_shards, nuts, threading.get_ident())
    key = jax.random.PRNGKey(np.uint32(nuts.seed * 100_003 + spec.index))
    init = {"z": jnp.asarray(z0 if nuts.chains > 1 else z0[0])}
    mcmc.run(key, jnp.asarray(centre), jnp.asarray(T), data, jnp.asarray(spec.var), init_params=init,
             extra_fields=("diverging", "num_steps", "adapt_state.step_size"))
    shape = (nuts.chains, nuts.samples)
    z = np.asarray(mcmc.get_samples(group_by_chain=True)["z"]).reshape(*shape, p)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    w = centre + z @ T.T
    theta = np.asarray(_compiled(spec.coords, spec.L, spec.n_shards)["theta"](jnp.asarray(w.reshape(-1, p))))
    return {
        "index": spec.index,
        "name": spec.name,
        "w": w,
        "theta": theta.reshape(w.shape),
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
