"""``xpcsfit.fit``: open the data, lay out tiles, run the solver, report, write."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from xpcsfit.config import FitConfig, load_config
from xpcsfit.engine.compile_cache import enable_compilation_cache
from xpcsfit.engine.evaluator import TileEvaluator
from xpcsfit.engine.specs import load_cluster_spec
from xpcsfit.engine.tiles import (
    DEFAULT_TILE,
    TileSpec,
    count_points,
    plan_tiles,
)
from xpcsfit.errors import ConfigError
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.result_dir import claim_result_directory
from xpcsfit.leastsq.checkpoint import Checkpoint, fingerprint
from xpcsfit.leastsq.determined import (
    DriftLog,
    determined_quantities,
    undetermined_record,
    window_times,
)
from xpcsfit.leastsq.initial import initial_estimates
from xpcsfit.leastsq.placement import (
    choose_in_process,
    fit_evaluator,
)
from xpcsfit.leastsq.results import (
    FitResult,
    correlation_warnings,
    input_record,
    provenance_record,
    transport_bands,
)
from xpcsfit.leastsq.starts import best_start, draw_starts, run_starts, starts_record
from xpcsfit.leastsq.uncertainty import (
    fit_covariance,
    noise_levels,
)
from xpcsfit.leastsq.write import write_result_directory
from xpcsfit.model import enable_float64
from xpcsfit.parameters import (
    DEFAULT_INITIAL,
    PER_BIN,
    ParameterLayout,
    physics_names,
    resolve_gap,
    warn_default_gap,
)
from xpcsfit.progress import say
from xpcsfit.solver import IterationReport, SolverState, TrustRegionLM


def fit(input, *, q=None, q_index=None, phi=None, frames=None, mode=None, gap=None,
        config=None, out=None, client=None, scheduler=None, tile=None, dt=None,
        progress=True, resume=True, cluster=None, in_process=None, starts=None, seed=None) -> FitResult:
    """Fit the homodyne model to two-time c2 data, in this process or on a Dask cluster.

    Parameters
    ----------
    input : str or Path
        APS-U / legacy HDF5 result file, or a store written by ``xpcsfit ingest``.
    q, q_index, phi, frames, dt
        Selection, as for :func:`xpcsfit.open_dataset` (q in 1/Å, phi in degrees,
        frames inclusive 0-based, dt in s). Default: every q with maps, all phi,
        frames 1 … T-1.
    mode : {"laminar_flow", "static"}, optional
        Default: the config's, else "laminar_flow".
    gap : float, optional
        Gap L in Å (laminar_flow). Default: the store's ``L`` (``xpcsfit ingest --gap``),
        else 2.0e6 Å with a :class:`GapWarning` (result files do not record it).
    config : str, Path, dict or FitConfig, optional
        YAML file or mapping (see :mod:`xpcsfit.config`); keywords override it.
    out : str or Path, optional
        Directory for fit.json, fitted.zarr and PNGs (replaced atomically). None: write
        nothing.
    client : distributed.Client, optional
        Default: inside a Dask task the worker's client; else ``scheduler``; else
        ``cluster``; else the process's default client; else a new LocalCluster.
    scheduler : str, optional
        Address of a running scheduler (``tls://``: certificates from Dask's configuration).
    cluster : str or Path, optional
        Cluster spec to start for this fit: a YAML file (see cluster/) or one of local,
        gpu, slurm, pbs, kubernetes (:mod:`xpcsfit.engine.specs`); checked before any work.
    tile : int, optional
        Tile edge in frames (default: the config's, else a store's chunk side, else 128).
    starts : int, optional
        Number of starts (default: the config's ``starts``, else 1). With N > 1: the
        usual start and N − 1 Latin hypercube starts inside the bounds, fitted in
        parallel on the cluster; the best is the result, and fit.json's ``starts`` says
        how many reached it and which converged elsewhere (:mod:`xpcsfit.leastsq.starts`).
        It runs on a cluster unless ``in_process=True`` (then the starts run one after
        another in this process).
        Such a fit is not resumed from a checkpoint.
    seed : int, optional
        Seed of the Latin hypercube (default: the config's ``starts_seed``, else 0).
    progress : bool
        Print one line per iteration.
    resume : bool
        With ``out``, the solver's state is saved after every iteration beside it
        (``.<out name>.checkpoint.json``, see :mod:`xpcsfit.leastsq.checkpoint`) and
        removed when the result is written. True (the default): rerunning a killed fit
        continues from its last saved iteration, to the parameters of an uninterrupted
        fit in fewer data passes, when the checkpoint's fingerprint (input content,
        selection, settings, start, bounds, version) matches this fit's. False: start
        over (the checkpoint is replaced). fit.json records a resumed fit under ``resumed_from``.
    in_process : bool, optional
        True: the whole fit runs in the calling process (:class:`InProcessEvaluator`:
        the same kernels and summation tree, no cluster, no Dask tasks); inside a Dask
        task it runs whole in that one task. False: on a cluster, chosen as ``client``
        says. None (default): in process when no client, scheduler or cluster is given,
        the call is not inside a Dask task, the process has no default Dask client, and
        the selection has at most :data:`~xpcsfit.leastsq.placement.IN_PROCESS_MAX_POINTS` points; else on a
        cluster. The first progress line says which and why; fit.json records it
        (``provenance.cluster`` "in process").

    Returns
    -------
    FitResult

    Raises
    ------
    InputError
        Unreadable or invalid input (missing keys, NaN/Inf in c2, bad dt in the file).
    ConfigError
        Bad selection, option or config value; ``in_process=True`` with a client,
        scheduler or cluster.
    """
    started = time.perf_counter()
    enable_float64()
    enable_compilation_cache()  # an in-process fit compiles here
    cluster = None if cluster is None else load_cluster_spec(cluster)
    cfg = load_config(config, mode=mode, gap=gap, tile=tile, starts=starts, starts_seed=seed)
    plan = _plan(input, cfg, dict(q=q, q_index=q_index, phi=phi, frames=frames, dt=dt))
    if cfg.starts > 1 and in_process is None:
        in_process = False  # the starts run as parallel tasks on a cluster
    local, why = choose_in_process(in_process, plan.n_points, client=client, scheduler=scheduler, cluster=cluster)
    say(progress, f"{_describe(input, cfg, plan)}; {why}")

    # The output is claimed before the cluster starts: a refused --out costs nothing.
    with claim_result_directory(out) as target, \
            fit_evaluator(local, input, cfg, plan, progress, client, scheduler, cluster) as (evaluator, where):
        for stale in getattr(target, "removed_partials", ()):
            say(progress, f"xpcsfit: removed {stale.name}, left by an interrupted run")
        if plan.gap_defaulted:
            # Warned once the tiles have loaded (and passed their checks): a file that
            # cannot be fitted gets its error alone.
            warn_default_gap(cfg.mode, stacklevel=2)
        result = _run(evaluator, where, cfg, plan, progress, target, resume, started)
    for w in result.warnings:
        say(progress, f"xpcsfit: warning: {w}")
    return result


@dataclass(frozen=True)
class _Plan:
    """What a fit works on, fixed before a cluster starts: the dataset, its tiles, the
    parameter layout, the tile size, the gap L (Å) and whether it is the default."""

    ds: xr.Dataset
    specs: list[TileSpec]
    layout: ParameterLayout
    size: int
    L: float
    gap_defaulted: bool
    n_points: int


def _plan(input, cfg: FitConfig, selection: dict) -> _Plan:
    """Open the selection of ``input`` and lay it out; refuse what cannot be fitted.

    Raises
    ------
    InputError, ConfigError
        As :func:`fit`, before any cluster work.
    """
    names = physics_names(cfg.mode)
    # NaN/Inf are checked as the workers load the tiles, in parallel, not here first.
    ds = open_dataset(input, **selection, tile=cfg.tile or DEFAULT_TILE, check_finite=False)
    size = cfg.tile or int(ds.attrs.get("tile", DEFAULT_TILE))
    L, gap_defaulted = resolve_gap(cfg, ds, warn=False)  # fit warns once the tiles loaded
    specs = plan_tiles(ds, size)
    n_points = count_points(ds)
    layout = ParameterLayout(names, ds.sizes["q"], ds.sizes["phi"])
    check_determinable(input, ds, n_points, layout)
    return _Plan(ds, specs, layout, size, L, gap_defaulted, n_points)


def _describe(input, cfg: FitConfig, plan: _Plan) -> str:
    """The first progress line: what is fitted, how many points, in how many tiles."""
    ds = plan.ds
    what = str(input) if Path(str(input)).name == Path(ds.attrs["source"]).name \
        else f"{input} (ingested from {ds.attrs['source']})"
    return (f"xpcsfit: {cfg.mode} fit of {what}: {ds.sizes['q']} q × {ds.sizes['phi']} phi × "
            f"{ds.sizes['t1']} frames = {plan.n_points:,} points in {len(plan.specs)} tiles of "
            f"{plan.size} frames")


def _run(evaluator: TileEvaluator, where: str, cfg, plan: _Plan, progress, target, resume, started) -> FitResult:
    """Solve (resuming from the checkpoint beside ``target``), record the input, the
    engine and the provenance (``where`` it ran), and write the result directory when
    there is a target."""
    checkpoint = Checkpoint(target.final, resume) if target is not None and cfg.starts == 1 else None
    result = _solve(evaluator, plan.ds, cfg, plan.layout, plan.L, plan.size, progress, checkpoint,
                    client=getattr(evaluator, "client", None), specs=plan.specs)
    result.provenance = provenance_record(cfg, plan.gap_defaulted, where)
    result.input = input_record(plan.ds, plan.n_points, plan.L)
    result.engine = {"tile_size": plan.size} | evaluator.stats()
    if target is None:
        result.wall_time_s = time.perf_counter() - started
        return result
    write_result_directory(target.partial, result, plan.ds, evaluator, plan.layout, cfg, plan.L, plan.size, started)
    target.commit()
    if checkpoint is not None:
        checkpoint.remove()
    return result


def _starting_point(evaluator: TileEvaluator, ds, cfg, layout, L):
    """x0 and bounds (P,): config values first, then data-driven estimates, then defaults.

    The same pass gives the noise level per bin, whose 1/σ² the evaluator then weights
    the points with (:mod:`xpcsfit.leastsq.uncertainty`).
    """
    lag_sums, lag_counts, lag_squares = evaluator.lag_sums(ds.sizes["t1"])
    evaluator.bin_weight = noise_levels(lag_sums, lag_counts, lag_squares) ** -2.0
    q_of_bin = np.repeat(ds["q"].values, layout.n_phi)
    phi_of_bin = np.tile(ds["phi"].values, layout.n_q)
    est = initial_estimates(lag_sums, lag_counts, q_of_bin, phi_of_bin, float(ds.attrs["dt"]),
                            cfg.mode, L)

    def inside(value, lo, hi):
        # Start strictly inside the box: a parameter on a bound at the start may be
        # held there by the active set on the first step.
        margin = 1e-3 * (hi - lo)
        return np.clip(value, lo + margin, hi - margin)

    theta0 = [float(inside(cfg.initial.get(n, est.get(n, DEFAULT_INITIAL[n])), *cfg.bound(n)))
              for n in layout.physics]
    per_bin = [inside(np.full(layout.n_bins, cfg.initial[n]) if n in cfg.initial else est[n], *cfg.bound(n))
               for n in PER_BIN]
    bounds = np.array([cfg.bound(n) for n in layout.physics]
                      + [cfg.bound(n) for n in PER_BIN for _ in range(layout.n_bins)])
    return layout.join(theta0, *per_bin), bounds[:, 0], bounds[:, 1]


def _solve(evaluator: TileEvaluator, ds, cfg, layout, L, size, progress, checkpoint=None,
           client=None, specs=None) -> FitResult:
    """Run the solver from the start values, or from ``checkpoint``'s saved state; with
    ``cfg.starts`` > 1, from that many starts as tasks on ``client`` over ``specs``.

    With a :class:`~xpcsfit.leastsq.checkpoint.Checkpoint`, the state is saved after every
    iteration; a saved state of this very fit (same fingerprint) is resumed from, and
    one that is not is named in one progress line with the reason.
    """
    def report(r: IterationReport):
        say(progress, f"  iter {r.iteration:3d}  cost {r.cost:.8e}  step {r.step_norm:.3e}  "
                      f"damping {r.damping:.2e}  rho {r.rho:.3f}  passes {r.passes}")

    with evaluator.phase("start values"):  # the start, and the normal equations there
        x0, lower, upper = _starting_point(evaluator, ds, cfg, layout, L)
        say(progress, "xpcsfit: start " + ", ".join(
            f"{n}={v:.4g}" for n, v in zip(layout.physics, x0[: layout.p])))
        solver = _solver(lower, upper, ds, cfg, layout, callback=report)
        state, resumed_from = None, None
        if checkpoint is not None:
            saved, note = checkpoint.open(fingerprint(ds, cfg, L, size, x0, lower, upper), ds.attrs["source"])
            if note:
                say(progress, note)
            if saved is not None:
                state, resumed_from = _resume(solver, evaluator, saved, checkpoint, progress)
        multi = None
        if cfg.starts > 1:
            state, multi = _multi_start(solver, evaluator, ds, cfg, layout, L, x0, lower, upper, client, specs,
                                        progress)
        if state is None:
            state = solver.init(evaluator, x0)
    drift = DriftLog(layout.physics, lower, upper)
    state = _iterate(solver, evaluator, state, checkpoint, progress, drift)
    this_run = "" if resumed_from is None else \
        f" ({evaluator.normal_passes + evaluator.cost_passes} in this run)"
    say(progress, f"xpcsfit: {solver.message(state)} after {state.iteration} iterations, "
                  f"{state.passes} data passes{this_run}")
    result = _result(state, solver.message(state), evaluator, ds, cfg, layout)
    drifted, drift_iterations = drift.drifted(), drift.iterations
    if multi is not None:  # the best start's drift, as logged on its worker
        outcomes, best, xs = multi
        drifted, drift_iterations = outcomes[best]["drifted"], outcomes[best]["drift_iterations"]
    result.undetermined, drift_warnings = undetermined_record(drifted, drift_iterations, state.converged)
    if multi is not None:
        result.starts, start_warnings = starts_record(outcomes, xs, best, result, cfg.starts_seed)
        result.warnings += start_warnings
        say(progress, f"xpcsfit: {result.starts['reached_best']} of {cfg.starts} starts reached the best "
                      f"(start {best}); {len(result.starts['distinct_minima'])} distinct minima")
    result.warnings += drift_warnings
    result.start, result.lower, result.upper, result.resumed_from = x0, lower, upper, resumed_from
    return result


def _solver(lower, upper, ds, cfg, layout, callback=None) -> TrustRegionLM:
    """The fit's solver: the config's options, convergence judged by what the data
    determine over the window of ``ds`` (:mod:`xpcsfit.leastsq.determined`)."""
    t = ds["t1"].values
    quantities = determined_quantities(layout, cfg.mode, window_times(t[0], t[-1]))
    return TrustRegionLM(lower, upper, callback=callback, quantities=quantities, **cfg.solver.model_dump())


def _multi_start(solver, evaluator, ds, cfg, layout, L, x0, lower, upper, client, specs, progress):
    """Fit from ``cfg.starts`` starts in parallel (:mod:`xpcsfit.leastsq.starts`); the
    best final state restored on ``evaluator`` (one normal-equations pass), and
    (outcomes, best index, starts (n, P))."""
    t = ds["t1"].values
    times = window_times(t[0], t[-1])
    xs = draw_starts(x0, lower, upper, layout.physics, cfg.starts, cfg.starts_seed, times, evaluator.costs,
                     layout.n_bins)
    say(progress, f"xpcsfit: fitting from {cfg.starts} starts (Latin hypercube, seed {cfg.starts_seed}) "
                  f"as parallel tasks")
    outcomes = run_starts(client, specs, layout, cfg.mode, L, cfg.solver.model_dump(), times, xs, lower, upper,
                          evaluator.bin_weight)
    best = best_start(outcomes)
    return solver.restore(evaluator, outcomes[best]["state"]), (outcomes, best, xs)


def _iterate(solver: TrustRegionLM, evaluator, state: SolverState, checkpoint, progress,
             drift: DriftLog | None = None) -> SolverState:
    """Step until the solver terminates, saving the state after every step (until the
    checkpoint cannot be written: then one warning, and no more tries); every state's
    physics parameters go to ``drift``."""
    if drift is not None:
        drift.add(state.x, state.settled_steps)
    while not solver.terminate(state)[0]:
        with evaluator.phase(f"iteration {state.iteration + 1}"):
            state = solver.step(evaluator, state)
        if drift is not None:
            drift.add(state.x, state.settled_steps)
        if checkpoint is not None:
            try:
                checkpoint.save(state.saved())
            except OSError as exc:
                say(progress, f"xpcsfit: warning: cannot write checkpoint {checkpoint.path} "
                              f"({exc.strerror or exc}); this fit continues without checkpoints")
                checkpoint = None
    return state


def _result(state: SolverState, termination: str, evaluator: TileEvaluator, ds, cfg, layout) -> FitResult:
    """The FitResult of a final state: covariance, standard errors, per-bin rms, bands.

    Raises
    ------
    ConfigError
        If there are no more points than parameters (no degrees of freedom).
    """
    ne = state.ne
    if not (np.isfinite(ne.cost) and np.all(np.isfinite(ne.jtj))):
        # extreme bounds (e.g. D0 in [1e200, 1e300]) overflow the model; the covariance
        # of non-finite normal equations would fail with a LinAlgError
        at = ", ".join(f"{n}={v:.4g}" for n, v in zip(layout.physics, state.x[: layout.p]))
        raise ConfigError(f"{ds.attrs['source']}: the model is not finite at {at} "
                          f"(dt = {ds.attrs['dt']:g} s); check the bounds")
    P = layout.size
    dof = ne.n - P
    chi2 = 2.0 * ne.cost  # Σ w r², w = 1/σ² per bin
    try:
        cov, warn, noise = fit_covariance(state, evaluator, ds, cfg, layout, chi2, dof)
    except np.linalg.LinAlgError as exc:  # e.g. "Eigenvalues did not converge"
        cov, noise = np.full((P, P), np.nan), {}
        warn = [f"the covariance could not be computed ({exc}): standard errors and bands are NaN"]
    warn += correlation_warnings(list(layout.physics), cov)
    if not state.converged:
        warn.insert(0, f"not converged: {termination}")
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    # The solver's final normal equations are those at its final x (every path to a
    # final state ends on a normal-equations pass at x); their per-bin residual sums
    # give the residual rms without another pass over the data.
    x_sums, sums = evaluator.last_block_sums
    assert np.array_equal(x_sums, state.x), "internal: the last normal-equations pass is not at x"
    theta, contrast, offset = layout.split(state.x)
    _, c_se, o_se = layout.split(se)
    t = ds["t1"].values
    shape = (layout.n_q, layout.n_phi)
    return FitResult(
        mode=cfg.mode, names=list(layout.physics), values=theta.copy(), stderr=se[: layout.p],
        q=ds["q"].values.astype(float), phi=ds["phi"].values.astype(float),
        contrast=contrast.reshape(shape), offset=offset.reshape(shape),
        contrast_stderr=c_se.reshape(shape), offset_stderr=o_se.reshape(shape),
        residual_rms=sums.residual_rms().reshape(shape), covariance=cov, covariance_names=layout.names(),
        noise=noise,
        chi2=chi2, reduced_chi2=chi2 / dof, dof=int(dof), n_points=int(ne.n),
        converged=bool(state.converged), termination=termination,
        iterations=state.iteration, data_passes=evaluator.normal_passes + evaluator.cost_passes,
        wall_time_s=float("nan"), transport=transport_bands(cfg.mode, theta, cov, np.linspace(t[0], t[-1], 200)),
        warnings=warn, x=state.x.copy(),
    )


def check_determinable(source, ds, n_points: int, layout: ParameterLayout) -> None:
    """Refuse a selection that cannot determine the fit's parameters, before any work.

    The start values fit g2(τ) = offset + contrast·exp(-kτ) per bin, which needs at
    least 3 lags (4 frames); the fit itself needs more points than parameters.

    Raises
    ------
    ConfigError
    """
    n_frames = ds.sizes["t1"]
    first, last = map(int, ds.attrs["frames"])
    if n_frames < 4:
        raise ConfigError(f"{source}: frames = ({first}, {last}): {n_frames} frames cannot determine "
                          "the start values; a fit needs at least 4 frames")
    if n_points <= layout.size:
        raise ConfigError(f"{source}: frames = ({first}, {last}): {n_points} points cannot determine "
                          f"{layout.size} parameters; select more frames or fewer bins")


def _resume(solver, evaluator, saved: dict, checkpoint, progress) -> tuple[SolverState | None, dict | None]:
    """The restored state and its ``resumed_from`` record, or (None, None) with a note."""
    try:
        state = solver.restore(evaluator, saved)
    except ValueError as exc:
        say(progress, checkpoint.not_used(f"invalid solver state ({exc})"))
        return None, None
    before = saved["normal_passes"] + saved["cost_passes"]
    say(progress, f"xpcsfit: resuming from checkpoint {checkpoint.path}: iteration {state.iteration}, "
                   f"cost {state.ne.cost:.8e}, {before} data passes made before")
    if state.ne.cost != saved["cost"]:
        # The fingerprint matched, so only a non-deterministic evaluation (other
        # hardware or libraries) gets here; the fit stays valid, its digits may differ.
        say(progress, f"xpcsfit: note: the cost at the saved x is now {state.ne.cost!r}, saved "
                       f"{saved['cost']!r}; the continued trajectory may differ in the last digits")
    return state, {"iteration": state.iteration, "data_passes": before, "checkpoint": str(checkpoint.path)}
