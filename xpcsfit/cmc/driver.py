"""``xpcsfit.cmc``: Bayesian uncertainties by Consensus Monte Carlo on Dask (DESIGN.md §5).

Pipeline: least-squares fit (or ``from_fit``) -> noise pass (one task per tile: residual
variance per bin, correlated-noise inflation; ``_cmc_noise``) -> K angle-complete shards,
each one NumPyro NUTS task (``client.submit``, retried; ``_cmc_model``) -> consensus
combination and diagnostics (``_cmc_combine``) -> DIR/posterior.zarr, summary.json, PNGs
(``_cmc_summary``).

Shards. Every tile (all phi of one q over one (t1, t2) time tile) is read once, by a
task that keeps its points on the lattice of every ``thin``-th frame; the lattice points
are dealt to the K shards by a fixed hash of their (t1, t2) frame pair
(``_cmc_model.shard_of``), like the random partition of Scott et al. (2016). Every shard
thus holds every bin (angle-complete: each point carries all phi of its q), the whole
time window and every lag, and the K sub-posteriors are alike. (Whole tiles per shard
would not do: J(t) near the start of the window is fixed only by the short-lag points
of the first rows, which a tile subset gives to one shard alone; the other shards'
sub-posteriors then extend to power laws that blow up there, far from Gaussian, and
their consensus is meaningless.)
"""

from __future__ import annotations

import json
import math
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

from xpcsfit.cmc import combine as comb
from xpcsfit.engine.cluster import dask_client
from xpcsfit.cmc.shard import Coordinates, ShardSpec, run_shard, tile_lattice
from xpcsfit.cmc.noise import MAX_LAG, noise_model, tile_noise_sums
from xpcsfit.cmc.results import CMCResult, finish
from xpcsfit.config import load_config
from xpcsfit.io.dataset import open_dataset
from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io.atomic import claim_result_directory
from xpcsfit.model import enable_float64
from xpcsfit.parameters import DEFAULT_GAP, MODES, ParameterLayout
from xpcsfit.engine.tiles import plan_tiles

TARGET_POINTS_PER_SHARD = 40_000  # lattice points; ~2-3 ms per gradient on one core
MIN_POINTS_PER_SHARD = 1_000
DEFAULT_THIN = 2
TILE = 128  # frames: the unit each tile task reads
PROGRESS_EVERY_S = 15.0


def _say(progress, message: str) -> None:
    if progress:
        print(message, flush=True)


def cmc(input, *, q=None, q_index=None, phi=None, frames=None, mode=None, gap=None,
        shards=None, warmup=500, samples=500, chains=2, thin=None, from_fit=None,
        combine="consensus", config=None, dt=None, out=None, client=None, scheduler=None,
        seed=0, target_accept=0.9, progress=True) -> CMCResult:
    """Posterior of the physics parameters by Consensus Monte Carlo with NUTS shards.

    The data are split into K angle-complete shards of time tiles; each shard runs
    NumPyro's NUTS as one Dask task (``client.submit``, retried when its worker dies)
    with the prior raised to the power 1/K; the sub-posteriors are combined draw by
    draw with full-covariance weights (Scott et al., "Bayes and big data: the
    consensus Monte Carlo algorithm", Int. J. Management Science and Engineering
    Management 11(2), 78-88, 2016).

    What the posterior conditions on, and assumes (details in ``xpcsfit.cmc.shard``
    and ``xpcsfit.cmc.noise``):

    - the points with t2 > t1 of the selection on the lattice of every ``thin``-th
      frame in t1 and t2 (all points with ``thin=1``);
    - a Gaussian likelihood with one noise variance per (q, phi) bin, estimated from
      the least-squares residuals (fixed, not sampled) and multiplied by the
      variance-inflation factor of the residual autocorrelation of each q (two-time
      noise is correlated along rows and columns; without it the posterior would be
      as falsely narrow as naive least-squares errors);
    - per-bin contrast and offset integrated out analytically (flat prior), per shard;
    - weakly informative priors inside the bounds, placed on NUTS's sampling coordinates
      (J and its log-slope at 1 s, the position of log D0 inside the interval the bounds
      allow; the same for gamma_dot): broad Normals, logit-normal factors on alpha, beta
      and phi0, zero outside the bounds (``xpcsfit.cmc.shard``).

    Parameters
    ----------
    input : str or Path
        APS-U / legacy HDF5 result file, or a store written by ``xpcsfit ingest``.
    q, q_index, phi, frames, dt
        Selection, as for :func:`xpcsfit.open_dataset` (q in 1/Å, phi in degrees,
        frames inclusive 0-based, dt in s). Default: the selection of ``from_fit`` if
        given, else every q with maps, all phi, frames 1 … T-1.
    mode : {"laminar_flow", "static"}, optional
        Default: that of ``from_fit``, else the config's, else "laminar_flow".
    gap : float, optional
        Gap L, Å. Default: that of ``from_fit``, else the store's, else 2.0e6 Å (with a warning).
    shards : int, optional
        K >= 1. Default: from the data size, about 40 000 lattice points per shard, at
        most one per diagonal time tile of at least 8 frames.
    warmup, samples, chains : int
        NUTS warm-up iterations, kept draws per chain, chains per shard (>= 1 each;
        R-hat needs >= 2 chains).
    target_accept : float
        NUTS's target acceptance probability, 0 < value < 1 (default 0.9). Raise it
        (0.95, 0.98) when shards report divergent transitions: smaller steps, more
        of them per draw.
    thin : int, optional
        Lattice stride in frames (>= 1). Default 2: on flow_small it keeps ~90 % of the
        information of all points (residual correlations span ~15 frames) at a quarter
        of the cost per gradient.
    from_fit : str, Path or FitResult, optional
        fit.json (or its directory) of a least-squares fit of the same data; None:
        the fit is run first (:func:`xpcsfit.fit`).
    combine : {"consensus", "parametric"}
        Sample-wise consensus with full covariance weights, or draws from the Gaussian
        product of the sub-posteriors.
    config : str, Path, dict or FitConfig, optional
        Bounds (and the least-squares fit's settings), as for :func:`xpcsfit.fit`.
    out : str or Path, optional
        Directory (replaced atomically) for posterior.zarr, summary.json, corner.png,
        trace.png, transport.png and, if the fit was run here, initial_fit.json.
    client : distributed.Client, optional
    scheduler : str, optional
        As for :func:`xpcsfit.fit`; default a new LocalCluster.
    seed : int
        Seeds every shard (shard k uses (seed, k)): a retried shard gives the same draws.
    progress : bool
        Print progress while shards run.

    Returns
    -------
    CMCResult
        ``draws`` (chains, samples, p) combined, ``shard_draws`` (K, chains, samples, p),
        ``summary`` (dict, as summary.json: "parameters" {name: mean, sd, q03, q97,
        r_hat, ess_bulk}, "shards", "transport" J(t) and gamma_dot(t) bands, ...).

    Raises
    ------
    ConfigError
        shards, warmup, samples, chains or thin < 1, unknown ``combine``, too many
        shards for the frames, a selection that does not match ``from_fit``, bounds of
        D0 or gamma_dot_t0 not positive.
    InputError
        Unreadable input, ``from_fit`` missing or malformed.

    See Also
    --------
    xpcsfit.fit : the least-squares fit the shards start from.

    Examples
    --------
    >>> r = xpcsfit.cmc("flow_small.hdf", q_index=8, shards=4, out="cmc8")  # doctest: +SKIP
    >>> r.J_draws([5.0, 10.0]).std(axis=0)                                   # doctest: +SKIP
    """
    started = time.perf_counter()
    enable_float64()
    _check_options(shards, warmup, samples, chains, thin, combine, seed, target_accept)
    fitted = _load_fit(from_fit) if from_fit is not None else None
    if fitted is not None:
        mode = mode or fitted["mode"]
        if fitted["mode"] != mode:
            raise ConfigError(f"{fitted['source']}: is a {fitted['mode']} fit, not {mode}")
        if gap is not None and fitted["gap"] is not None and not math.isclose(gap, fitted["gap"]):
            raise ConfigError(f"{fitted['source']}: was fitted with gap {fitted['gap']:.6g} Å, not {gap:.6g} Å")
        gap = gap if gap is not None else fitted["gap"]
        if q is None and q_index is None:
            q_index = fitted["q_index"] or None
            q = None if q_index else fitted["q"]
        phi = fitted["phi"] if phi is None else phi
        frames = tuple(fitted["frames"]) if frames is None else frames
        dt = fitted["dt"] if dt is None else dt
        if config is None and fitted["bounds"]:
            config = {"bounds": fitted["bounds"]}
    cfg = load_config(config, mode=mode, gap=gap)
    names = MODES[cfg.mode]
    coords = _coordinates(cfg, names)
    thin = DEFAULT_THIN if thin is None else int(thin)
    ds = open_dataset(input, q=q, q_index=q_index, phi=phi, frames=frames, dt=dt)
    L = cfg.gap if cfg.gap is not None else ds.attrs.get("L")  # a store records its gap
    if L is None:
        L = DEFAULT_GAP
        if cfg.mode == "laminar_flow":
            from xpcsfit.parameters import GapWarning

            warnings.warn(f"gap L not given; using the default {DEFAULT_GAP:.1e} Å (the result files "
                          "do not record it)", GapWarning, stacklevel=2)
    if fitted is not None:
        _check_matches(fitted, ds)
    n_q, n_phi, n_t = ds.sizes["q"], ds.sizes["phi"], ds.sizes["t1"]
    m = -(-n_t // thin)
    n_lattice = n_q * n_phi * m * (m - 1) // 2
    K = _n_shards(n_lattice, shards)
    size = min(TILE, n_t)
    plan = plan_tiles(ds, size)
    layout = ParameterLayout(names, n_q, n_phi)
    _say(progress, f"xpcsfit cmc: {cfg.mode}, {ds.attrs['source']}: {n_q} q × {n_phi} phi × {n_t} frames; "
                   f"{K} shards of ~{n_lattice // K:,} points (every {thin}. frame in t1 and t2), "
                   f"{chains} chains × ({warmup} warm-up + {samples}) draws each")

    def announce(c):
        _say(progress, f"xpcsfit cmc: started a LocalCluster, dashboard {c.dashboard_link}")

    # The output is claimed before the cluster starts: a refused --out costs nothing.
    with claim_result_directory(out) as target, dask_client(client, scheduler, on_start=announce) as cl:
        fit_result = None
        if fitted is None:
            from xpcsfit.leastsq.driver import fit

            _say(progress, "xpcsfit cmc: least-squares fit first (initial point, noise level)")
            fit_result = fit(input, q=q, q_index=q_index, phi=phi, frames=frames, mode=cfg.mode,
                             gap=L, config=config, client=cl, dt=dt, progress=False)
            fitted = _fit_dict(fit_result, "least-squares fit run by cmc")
            _check_matches(fitted, ds)
        x = layout.join(fitted["theta"], np.ravel(fitted["contrast"]), np.ravel(fitted["offset"]))
        _say(progress, "xpcsfit cmc: start " + ", ".join(f"{n}={v:.5g}" for n, v in zip(names, fitted["theta"])))
        noise, lattices = _tile_pass(cl, plan, x, layout, cfg.mode, L, thin, n_t)
        _say(progress, "xpcsfit cmc: noise sd per bin " + _range(noise["sigma"])
             + "; correlated-noise inflation kappa " + ", ".join(f"{k:.3g}" for k in noise["kappa"])
             + f" (correlation length {', '.join(f'{c:g}' for c in noise['correlation_length'])} frames)")
        var = noise["var"] * np.repeat(noise["kappa"], n_phi)
        w_start = coords.from_theta(fitted["theta"])
        specs = [ShardSpec(index=k, name=f"shard-{k:02d}", n_shards=K, coords=coords, L=float(L), var=var,
                           n_bins=layout.n_bins, w_start=w_start, warmup=int(warmup),
                           samples=int(samples), chains=int(chains), seed=int(seed),
                           target_accept=float(target_accept))
                 for k in range(K)]
        try:
            results = _run_shards(cl, lattices, specs, progress)
        finally:
            cl.cancel(lattices)
        return finish(results, specs, coords, cfg, L, ds, fitted, fit_result, noise, thin, size,
                      combine, seed, target, started, progress, n_lattice)


# ---------------------------------------------------------------- options and inputs


def _check_options(shards, warmup, samples, chains, thin, combine, seed, target_accept):
    def positive(name, value, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}: need an integer >= 1, got {value!r}")

    positive("shards", shards, allow_none=True)
    positive("warmup", warmup)
    positive("samples", samples)
    positive("chains", chains)
    positive("thin", thin, allow_none=True)
    if combine not in comb.COMBINE_METHODS:
        raise ConfigError(f"combine: unknown method {combine!r}; choose one of {', '.join(comb.COMBINE_METHODS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: need an integer >= 0, got {seed!r}")
    if (isinstance(target_accept, bool) or not isinstance(target_accept, (int, float, np.floating))
            or not 0.0 < target_accept < 1.0):
        raise ConfigError(f"target_accept: need a number between 0 and 1, got {target_accept!r}")


def _coordinates(cfg, names) -> Coordinates:
    lower, upper = [], []
    for n in names:
        lo, hi = cfg.bound(n)
        if n in ("D0", "gamma_dot_t0") and lo <= 0:
            raise ConfigError(f"bounds.{n}: cmc needs a positive lower bound (its prior is on log {n}), got {lo}")
        lower.append(float(lo))
        upper.append(float(hi))
    return Coordinates(cfg.mode, tuple(names), tuple(lower), tuple(upper))


def _n_shards(n_lattice, shards) -> int:
    """K: given, else about TARGET_POINTS_PER_SHARD lattice points per shard."""
    most = max(1, n_lattice // MIN_POINTS_PER_SHARD)
    if shards is None:
        return int(min(most, max(1, math.ceil(n_lattice / TARGET_POINTS_PER_SHARD))))
    if shards > most:
        raise ConfigError(f"shards: {shards} is too many for {n_lattice:,} points; at most {most} "
                          f"(>= {MIN_POINTS_PER_SHARD:,} points per shard); select more data or a smaller thin")
    return int(shards)


def _load_fit(source) -> dict:
    from xpcsfit.leastsq.results import FitResult

    if isinstance(source, FitResult):
        return _fit_dict(source, "FitResult")
    path = Path(source)
    if path.is_dir():
        path = path / "fit.json"
    if not path.is_file():
        raise InputError(f"{path}: no such fit file")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable fit.json ({str(exc).splitlines()[0]})") from None
    try:
        mode = d["mode"]
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} unknown")
        theta = np.array([float(d["parameters"][n]["value"]) for n in MODES[mode]])
        inp = d["input"]
        q = [float(v) for v in inp["q"]]
        phi = [float(v) for v in inp["phi"]]
        shape = (len(q), len(phi))
        contrast = np.asarray(d["per_angle"]["contrast"], float).reshape(shape)
        offset = np.asarray(d["per_angle"]["offset"], float).reshape(shape)
        cfg = d.get("provenance", {}).get("config", {})
        gap = cfg.get("gap")
        fitted = {
            "source": str(path), "mode": mode, "theta": theta, "contrast": contrast, "offset": offset,
            "q": q, "q_index": [int(i) for i in inp.get("q_index") or []], "phi": phi,
            "frames": [int(f) for f in inp["frames"]], "dt": float(inp["dt"]),
            "gap": None if gap is None else float(gap), "bounds": dict(cfg.get("bounds") or {}),
            "sha256": inp.get("sha256"), "path": inp.get("path"),
        }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise InputError(f"{path}: malformed fit.json ({what})") from None
    if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(contrast)) and np.all(np.isfinite(offset))):
        raise InputError(f"{path}: malformed fit.json (non-finite parameter values)")
    if len(fitted["frames"]) != 2:
        raise InputError(f"{path}: malformed fit.json (input.frames must be [first, last])")
    return fitted


def _fit_dict(r, source) -> dict:
    cfg = r.provenance.get("config", {}) if r.provenance else {}
    inp = r.input or {}
    return {
        "source": source, "mode": r.mode, "theta": np.asarray(r.values, float),
        "contrast": np.asarray(r.contrast, float), "offset": np.asarray(r.offset, float),
        "q": [float(v) for v in r.q], "q_index": list(inp.get("q_index", [])),
        "phi": [float(v) for v in r.phi], "frames": list(inp.get("frames", [])),
        "dt": inp.get("dt"), "gap": cfg.get("gap"), "bounds": dict(cfg.get("bounds") or {}),
        "sha256": inp.get("sha256"), "path": inp.get("path"),
    }


def _check_matches(fitted, ds):
    src = fitted["source"]
    if fitted.get("sha256") and ds.attrs.get("sha256") and fitted["sha256"] != ds.attrs["sha256"]:
        raise ConfigError(f"{src}: was fitted to {fitted.get('path')} (sha256 {fitted['sha256'][:12]}…), "
                          f"not to {ds.attrs['source']}")
    for key, have in (("q", ds["q"].values), ("phi", ds["phi"].values)):
        want = np.asarray(fitted[key], float)
        if want.shape != have.shape or not np.allclose(want, have, rtol=1e-6):
            raise ConfigError(f"{src}: was fitted for {key} = {np.round(want, 6).tolist()}, "
                              f"the selection has {np.round(have, 6).tolist()}")
    if fitted["frames"] and list(fitted["frames"]) != list(ds.attrs["frames"]):
        raise ConfigError(f"{src}: was fitted for frames {list(fitted['frames'])}, "
                          f"the selection has {list(ds.attrs['frames'])}")


# ---------------------------------------------------------------- distributed work


def _tile_pass(cl, plan, x, layout, mode, L, thin, n_t):
    """One noise task and one lattice task per tile; (noise model, lattice futures)."""
    max_lag = max(1, min(MAX_LAG, plan[0].size // 2))
    token = uuid.uuid4().hex[:12]
    noise_f = [cl.submit(tile_noise_sums, t, x, layout, mode, L, max_lag, pure=False,
                         key=f"xpcsfit-cmc-noise-{i}-{token}") for i, t in enumerate(plan)]
    lattices = [cl.submit(tile_lattice, t, thin, pure=False, key=f"xpcsfit-cmc-lattice-{i}-{token}")
                for i, t in enumerate(plan)]
    try:
        parts = cl.gather(noise_f)
    except BaseException:
        cl.cancel(lattices)
        raise
    finally:
        cl.cancel(noise_f)
    return noise_model(parts, layout.n_q, layout.n_bins, thin, max_lag), lattices


def _run_shards(cl, lattices, specs, progress) -> list[dict]:
    from distributed import wait

    token = uuid.uuid4().hex[:12]
    futures = {}
    try:
        for spec in specs:
            # Each shard task takes every tile's lattice (futures, recomputed from the
            # source if the worker holding one dies) and keeps its own points.
            f = cl.submit(run_shard, spec, lattices, retries=2, pure=False,
                          key=f"xpcsfit-cmc-{spec.name}-{token}")
            futures[f] = spec
        t0 = time.perf_counter()
        pending = set(futures)
        results = {}
        while pending:
            try:
                done, pending = wait(list(pending), timeout=PROGRESS_EVERY_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for f in done:
                spec = futures[f]
                try:
                    r = f.result()
                except Exception as exc:  # after retries: reported, never dropped silently
                    r = {"index": spec.index, "name": spec.name, "error": f"{type(exc).__name__}: {exc}"}
                    _say(progress, f"xpcsfit cmc: {spec.name} FAILED: {r['error']}")
                else:
                    stats = comb.describe_all(spec.coords.names, r["theta"])
                    _say(progress, f"xpcsfit cmc: {spec.name} done in {r['wall_time_s']:.0f} s on {r['worker']}: "
                                   f"{r['n_points']:,} points, R-hat max {max(s['r_hat'] for s in stats.values()):.3f}, "
                                   f"bulk ESS min {min(s['ess_bulk'] for s in stats.values()):.0f}, "
                                   f"{int(r['diverging'].sum())} divergences "
                                   f"[{len(results) + 1}/{len(specs)} done, {time.perf_counter() - t0:.0f} s]")
                results[spec.index] = r
            if not done and pending:
                running = sum(1 for keys in cl.processing().values() for k in keys if "xpcsfit-cmc-shard" in str(k))
                _say(progress, f"xpcsfit cmc: {len(results)}/{len(specs)} shards done, {running} running, "
                               f"{time.perf_counter() - t0:.0f} s")
    finally:
        cl.cancel(list(futures))
    return [results[s.index] for s in specs]


def _range(a) -> str:
    a = np.asarray(a, float)
    return f"{a.min():.3g}" if np.ptp(a) == 0 else f"{a.min():.3g}-{a.max():.3g}"
