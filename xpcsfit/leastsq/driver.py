"""``xpcsfit.fit``: open the data, lay out tiles, run the solver, report, write."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from xpcsfit.config import FitConfig, load_config
from xpcsfit.engine.cluster import dask_client
from xpcsfit.engine.evaluator import DaskEvaluator, InProcessEvaluator, TileEvaluator
from xpcsfit.engine.spans import span_label
from xpcsfit.engine.specs import load_cluster_spec
from xpcsfit.engine.tiles import (
    DEFAULT_TILE,
    TileSpec,
    count_points,
    load_tiles,
    plan_tiles,
)
from xpcsfit.errors import ConfigError
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.result_dir import claim_result_directory, result_manifest
from xpcsfit.leastsq.checkpoint import Checkpoint, fingerprint
from xpcsfit.leastsq.initial import initial_estimates
from xpcsfit.leastsq.output import create_fitted_store, write_fitted_tile
from xpcsfit.leastsq.results import (
    FitResult,
    correlation_warnings,
    covariance_from_normal_equations,
    input_record,
    provenance_record,
    transport_bands,
)
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
        progress=True, resume=True, cluster=None, in_process=None) -> FitResult:
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
        the selection has at most :data:`IN_PROCESS_MAX_POINTS` points; else on a
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
    cluster = None if cluster is None else load_cluster_spec(cluster)
    cfg = load_config(config, mode=mode, gap=gap, tile=tile)
    plan = _plan(input, cfg, dict(q=q, q_index=q_index, phi=phi, frames=frames, dt=dt))
    local, why = choose_in_process(in_process, plan.n_points, client=client, scheduler=scheduler, cluster=cluster)
    say(progress, f"{_describe(input, cfg, plan)}; {why}")

    # The output is claimed before the cluster starts: a refused --out costs nothing.
    with claim_result_directory(out) as target, \
            _evaluator(local, input, cfg, plan, progress, client, scheduler, cluster) as (evaluator, where):
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


# The most points that ``fit(in_process=None)`` fits in process. Measured on the 2-core
# development machine with benchmarks/bench_in_process.py (README "In process or on a
# cluster"): the whole fit with --out, each in a fresh Python process, in process against a
# fresh 2-worker LocalCluster, laminar_flow, 8 phi: in process was faster at every size
# tried — 1.06× at 1.0 M points, 2.2× at 4.0 M, 2.9× at 9.0 M, 1.8× at 16.0 M (load
# average 9-12 from other work on the machine). On an idle machine the two workers
# pass at ~0.6 of one process's time per pass (B2: 0.25 vs 0.42 s), which pays for the
# cluster's ~3 s start at ~20 M points over a fit's ~10 passes; 16 M is the largest size
# measured faster in process. Memory in process: the padded tiles, (4 + 8/n_phi) bytes
# per point plus the edge tiles' padding, and one q's whole map while its tiles are made
# (8 bytes per point): at most ~20 bytes per point (n_phi = 1), about 0.35 GB at this
# limit (0.2 GB at 8 phi), plus one tile's kernel workspace.
IN_PROCESS_MAX_POINTS = 16_000_000


def choose_in_process(in_process, n_points: int, *, client=None, scheduler=None, cluster=None) -> tuple[bool, str]:
    """Whether a fit of ``n_points`` runs in process, and why (a phrase for its first line).

    See :func:`fit`'s ``in_process``.

    Raises
    ------
    ConfigError
        ``in_process`` not True, False or None, or True with a client, scheduler or cluster.
    """
    given = next((name for name, v in (("client", client), ("scheduler", scheduler), ("cluster", cluster))
                  if v is not None), None)
    if in_process is True:
        if given:
            raise ConfigError(f"in_process=True and a {given}: the fit runs either in this process "
                              "or on a cluster; give one, not both")
        return True, "in process (in_process=True)"
    if in_process is False:
        return False, "on a Dask cluster (in_process=False)"
    if in_process is not None:
        raise ConfigError(f"in_process={in_process!r}: True, False or None (choose from the number of points)")
    if given:
        return False, f"on a Dask cluster (a {given} was given)"
    from distributed import default_client, get_worker

    try:
        get_worker()
        return False, "on the Dask cluster of the task it runs in (in_process=True runs it whole in the task)"
    except ValueError:
        pass
    try:
        default_client()
        return False, "on the process's default Dask client"
    except ValueError:
        pass
    if n_points > IN_PROCESS_MAX_POINTS:
        return False, f"on a Dask cluster ({n_points:,} points > {IN_PROCESS_MAX_POINTS:,}, the in-process limit)"
    return True, f"in process ({n_points:,} points ≤ {IN_PROCESS_MAX_POINTS:,} and no cluster or client given)"


@contextlib.contextmanager
def _evaluator(local: bool, input, cfg, plan, progress, client, scheduler, cluster):
    """Yield the fit's evaluator (tiles loaded) and where it runs (fit.json's
    ``provenance.cluster``): in process, or on the client :func:`dask_client` gives."""
    if local:
        evaluator = InProcessEvaluator(load_tiles(plan.ds, plan.specs), plan.layout, cfg.mode, plan.L)
        say(progress, f"xpcsfit: {evaluator.n_tiles} tiles loaded in process ({evaluator.tile_bytes / 2**20:.0f} MiB)")
        try:
            yield evaluator, "in process"
        finally:
            evaluator.close()
        return

    def announce(c, what):
        say(progress, f"xpcsfit: started {what}, dashboard {c.dashboard_link}")

    with dask_client(client, scheduler, on_start=announce, cluster=cluster) as cl:
        evaluator = DaskEvaluator(cl, plan.specs, plan.layout, cfg.mode, plan.L, storage=cfg.memory,
                                  span=("xpcsfit fit", span_label(input, plan.ds["q"].values)))
        say(progress, f"xpcsfit: tiles in {len(evaluator.parts)} parts on {evaluator.n_workers} workers, "
                      f"memory {evaluator.storage} ({evaluator.tile_bytes / 2**20:.0f} MiB padded)")
        try:
            yield evaluator, f"{cl.scheduler.address} ({evaluator.n_workers} workers)"
        finally:
            evaluator.close()


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
    checkpoint = Checkpoint(target.final, resume) if target is not None else None
    result = _solve(evaluator, plan.ds, cfg, plan.layout, plan.L, plan.size, progress, checkpoint)
    result.provenance = provenance_record(cfg, plan.gap_defaulted, where)
    result.input = input_record(plan.ds, plan.n_points, plan.L)
    result.engine = {"tile_size": plan.size} | evaluator.stats()
    if target is None:
        result.wall_time_s = time.perf_counter() - started
        return result
    _write(target.partial, result, plan.ds, evaluator, plan.layout, cfg, plan.L, plan.size, started)
    target.commit()
    checkpoint.remove()
    return result


def _starting_point(evaluator: TileEvaluator, ds, cfg, layout, L):
    """x0 and bounds (P,): config values first, then data-driven estimates, then defaults."""
    lag_sums, lag_counts = evaluator.lag_sums(ds.sizes["t1"])
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


def _solve(evaluator: TileEvaluator, ds, cfg, layout, L, size, progress, checkpoint=None) -> FitResult:
    """Run the solver from the start values, or from ``checkpoint``'s saved state.

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
        solver = TrustRegionLM(lower, upper, callback=report, **cfg.solver.model_dump())
        state, resumed_from = None, None
        if checkpoint is not None:
            saved, note = checkpoint.open(fingerprint(ds, cfg, L, size, x0, lower, upper), ds.attrs["source"])
            if note:
                say(progress, note)
            if saved is not None:
                state, resumed_from = _resume(solver, evaluator, saved, checkpoint, progress)
        if state is None:
            state = solver.init(evaluator, x0)
    state = _iterate(solver, evaluator, state, checkpoint, progress)
    this_run = "" if resumed_from is None else \
        f" ({evaluator.normal_passes + evaluator.cost_passes} in this run)"
    say(progress, f"xpcsfit: {solver.message(state)} after {state.iteration} iterations, "
                  f"{state.passes} data passes{this_run}")
    result = _result(state, solver.message(state), evaluator, ds, cfg, layout)
    result.start, result.lower, result.upper, result.resumed_from = x0, lower, upper, resumed_from
    return result


def _iterate(solver: TrustRegionLM, evaluator, state: SolverState, checkpoint, progress) -> SolverState:
    """Step until the solver terminates, saving the state after every step (until the
    checkpoint cannot be written: then one warning, and no more tries)."""
    while not solver.terminate(state)[0]:
        with evaluator.phase(f"iteration {state.iteration + 1}"):
            state = solver.step(evaluator, state)
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
    chi2 = 2.0 * ne.cost
    cov, warn = covariance_from_normal_equations(ne.jtj, chi2, dof)
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


def _write(tmp, result, ds, evaluator, layout, cfg, L, size, started):
    """Write fit.json, fitted.zarr and the PNGs into the partial result directory ``tmp``.

    One pass over the tiles on the workers writes fitted.zarr and sends back only the
    points of the heatmap grid (every ``stride_for(T)``-th frame, at most MAX_PIXELS
    across), so neither the input nor fitted.zarr is read again, and the driver holds
    about 2 × n_q × n_phi × MAX_PIXELS² float32 whatever the number of frames.
    """
    from xpcsfit.leastsq.plots import heatmap_png, stride_for, transport_png

    t = ds["t1"].values
    first = int(ds.attrs["frames"][0])
    lead = first % size  # fitted.zarr starts at an aligned frame: its chunks are the tiles
    t_out = (np.arange(-lead, t.size) + first) * float(ds.attrs["dt"])
    s = stride_for(t.size)
    m = len(range(0, t.size, s))
    store = tmp / "fitted.zarr"
    create_fitted_store(store, ds["q"].values, ds["phi"].values, t_out, size)
    with evaluator.phase("write outputs"):
        samples = evaluator.map_tiles("write-outputs", _write_tile, result.x, layout, cfg.mode, L, str(store),
                                      lead, s)
    data = np.full((layout.n_q, layout.n_phi, m, m), np.nan, np.float32)
    model = np.full_like(data, np.nan)
    while samples:  # pop: each sample is freed once copied into the grids
        iq, g1, g2, d, f = samples.pop()
        n1, n2 = d.shape[1:]
        data[iq, :, g1 : g1 + n1, g2 : g2 + n2] = d
        model[iq, :, g1 : g1 + n1, g2 : g2 + n2] = f
    for iq, qv in enumerate(result.q):
        for ip, pv in enumerate(result.phi):
            heatmap_png(tmp / f"c2_q{iq}_phi{ip}.png", t[::s], data[iq, ip], model[iq, ip],
                        f"q = {qv:.5g} 1/Å, phi = {pv:.4g}°")
    transport_png(tmp / "transport.png", result.transport, cfg.mode)
    result.wall_time_s = time.perf_counter() - started
    record = result.to_dict() | {"files": result_manifest(tmp)}
    (tmp / "fit.json").write_text(json.dumps(record, indent=1, allow_nan=True))


def _write_tile(tile, x, layout, mode, L, path, lead, stride):
    """Worker task: write one tile's fitted.zarr chunks, return its heatmap-grid points.

    The heatmap grid is dataset frames 0, stride, 2·stride, … along t1 and t2.

    Returns
    -------
    (q position, first grid row, first grid column, data, model)
        ``data`` and ``model`` (n_phi, rows, columns) float32: the tile's c2 and fitted
        c2 on the grid points it holds, NaN where not fitted (t2 <= t1).
    """
    fitted = write_fitted_tile(tile, x, layout, mode, L, path, lead)
    (r0, c0), (n1, n2) = tile.start, tile.extent
    i0, j0 = -r0 % stride, -c0 % stride  # first tile row / column on the grid
    rows, cols = slice(i0, n1, stride), slice(j0, n2, stride)
    w = tile.weight[rows, cols] > 0
    data = np.where(w, tile.c2[:, rows, cols], np.nan).astype(np.float32)
    model = np.where(w, fitted[:, rows, cols], np.nan).astype(np.float32)
    return tile.index[0], (r0 + i0) // stride, (c0 + j0) // stride, data, model
