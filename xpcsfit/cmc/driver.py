"""``xpcsfit.cmc``: Bayesian uncertainties by Consensus Monte Carlo on Dask (DESIGN.md §5).

Pipeline: options -> plan (selection, tiles; before any cluster starts) ->
least-squares fit (or ``from_fit``) -> one pass over the tiles (the evaluator's
``map_tiles``: residual variance per bin and correlated-noise inflation,
:mod:`xpcsfit.noise`, and each tile's lattice points) -> K, when not given, from the
worker threads and how well the data determine J and gamma_dot
(:func:`xpcsfit.cmc.plan.choose_shards`) -> K angle-complete shards,
each one NumPyro NUTS task (``client.submit``, retried; :mod:`xpcsfit.cmc.shard`) ->
consensus combination and diagnostics (:mod:`xpcsfit.cmc.combine`) -> summary and
DIR/posterior.zarr, summary.json, PNGs (:mod:`xpcsfit.cmc.results`).

What the posterior conditions on, and assumes:

- the points with t2 > t1 of the selection on the lattice of every ``thin``-th frame
  in t1 and t2 (all points with ``thin=1``);
- a Gaussian likelihood with one noise variance per (q, phi) bin, estimated from the
  least-squares residuals (fixed, not sampled) and multiplied by the variance-inflation
  factor of the residual autocorrelation of each q (two-time noise is correlated along
  rows and columns; without it the posterior would be as falsely narrow as naive
  least-squares errors; :mod:`xpcsfit.noise`);
- per-bin contrast and offset integrated out analytically (flat prior), per shard
  (:mod:`xpcsfit.cmc.likelihood`);
- weakly informative priors inside the bounds, placed on NUTS's sampling coordinates
  (J's mean and signed rms variation over the measured window, the position of its
  window-mean amplitude inside the interval the bounds allow; the same for gamma_dot;
  phi0 on the logit scale): broad Normals, zero outside the bounds
  (:mod:`xpcsfit.cmc.coordinates`).

In the dashboard the run is the span ``("xpcsfit cmc", "<file> q=<q>")``, with the
least-squares fit run first (its own "xpcsfit fit" span), the "noise pass" and the
"shards" inside; the shard tasks' keys are ``("xpcsfit-cmc-shard-<token>", k)``
(:mod:`xpcsfit.engine.spans`).

Shards. Every tile (all phi of one q over one (t1, t2) time tile) is read once, and its
points on the lattice of every ``thin``-th frame come back; the lattice points are dealt
to the K shards by a fixed hash of their (t1, t2) frame pair
(:func:`xpcsfit.cmc.shard.shard_of`), like the random partition of Scott et al. (2016).
Every shard thus holds every bin (angle-complete: each point carries all phi of its q),
the whole time window and every lag, and the K sub-posteriors are alike. (Whole tiles
per shard would not do: J(t) near the start of the window is fixed only by the
short-lag points of the first rows, which a tile subset gives to one shard alone; the
other shards' sub-posteriors then extend to power laws that blow up there, far from
Gaussian, and their consensus is meaningless.) Each shard task carries its own points,
so a shard whose worker dies is retried elsewhere from the scheduler's copy.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from xpcsfit.cmc import combine as comb
from xpcsfit.cmc.likelihood import pad_to_common_shapes
from xpcsfit.cmc.plan import (
    PROBE_POINTS,
    CMCRun,
    InitialFit,
    Plan,
    Selection,
    check_matches,
    check_options,
    choose_shards,
    defaults_from_fit,
    initial_fit,
    make_plan,
)
from xpcsfit.cmc.results import CMCResult, report, summarise, write
from xpcsfit.cmc.shard import (
    SamplerSettings,
    ShardSpec,
    laplace_sd,
    run_shard,
    shard_data,
    tile_lattice,
)
from xpcsfit.engine.cluster import dask_client
from xpcsfit.engine.evaluator import DaskEvaluator
from xpcsfit.engine.spans import new_token, span_label, task_kind, task_name
from xpcsfit.engine.specs import load_cluster_spec
from xpcsfit.io.result_dir import claim_result_directory
from xpcsfit.leastsq.driver import fit
from xpcsfit.leastsq.results import FitResult
from xpcsfit.model import enable_float64
from xpcsfit.noise import MAX_LAG, noise_model, tile_noise_sums
from xpcsfit.progress import say

PROGRESS_EVERY_S = 15.0


def cmc(input, *, q=None, q_index=None, phi=None, frames=None, mode=None, gap=None,
        shards=None, warmup=500, samples=500, chains=2, thin=None, from_fit=None,
        combine="consensus", config=None, dt=None, out=None, client=None, scheduler=None,
        seed=0, target_accept=0.9, progress=True, cluster=None) -> CMCResult:
    """Posterior of the physics parameters by Consensus Monte Carlo with NUTS shards.

    K angle-complete shards, each one NumPyro NUTS task (``client.submit``, retried when
    its worker dies) with the prior raised to the power 1/K, combined draw by draw with
    full-covariance weights (Scott et al., "Bayes and big data: the consensus Monte Carlo
    algorithm", Int. J. Management Science and Engineering Management 11(2), 78-88, 2016).
    What the posterior conditions on and assumes: :mod:`xpcsfit.cmc.driver`.

    Parameters
    ----------
    input : str or Path
        APS-U / legacy HDF5 result file, or a store written by ``xpcsfit ingest``.
    q, q_index, phi, frames, dt, config, client, scheduler, cluster
        As for :func:`xpcsfit.fit` (config: bounds, and the least-squares fit's settings).
        Selection default: that of ``from_fit``, else every q with maps, all phi, frames 1 … T-1.
    mode : {"laminar_flow", "static"}, optional
        Default: that of ``from_fit``, else the config's, else "laminar_flow".
    gap : float, optional
        Gap L, Å. Default: that of ``from_fit``, else the store's, else 2.0e6 Å (with a warning).
    shards : int, optional
        K >= 1. Default: the cluster's worker threads, fewer where a shard would determine
        J's or gamma_dot's window mean to worse than 6 % (:func:`xpcsfit.cmc.plan.choose_shards`).
    warmup, samples, chains : int
        NUTS warm-up iterations, kept draws per chain, chains per shard (>= 1; R-hat needs 2 chains).
    thin : int, optional
        Lattice stride in frames (>= 1). Default 2: on flow_small ~90 % of the information
        of all points (residual correlations span ~15 frames) at a quarter of the cost.
    from_fit : str, Path or FitResult, optional
        fit.json (or its directory) of a least-squares fit of the same data; None: the fit is run first.
    combine : {"consensus", "parametric"}
        Sample-wise consensus, or draws from the Gaussian product of the sub-posteriors.
    out : str or Path, optional
        Directory (replaced atomically) for posterior.zarr, summary.json, corner.png,
        trace.png, transport.png and, if the fit was run here, initial_fit.json.
    seed : int
        Shard k uses (seed, k): a retried shard gives the same draws.
    target_accept : float
        NUTS's target acceptance probability, 0 < value < 1 (default 0.9); raise it (0.95,
        0.98) when shards report divergent transitions.
    progress : bool
        Print progress while shards run.

    Returns
    -------
    CMCResult
        ``draws`` (chains, samples, p) combined, ``shard_draws`` (K, chains, samples, p),
        ``summary`` (summary.json: "parameters", "shards", "transport" bands, ...).

    Raises
    ------
    ConfigError
        Options out of range, too many shards, a selection or mode that does not match
        ``from_fit``, bounds of D0 or gamma_dot_t0 not positive.
    InputError
        Unreadable input, ``from_fit`` missing or malformed.
    SamplingError
        Every shard failed.
    """
    from distributed import span

    started = time.perf_counter()
    enable_float64()  # the coordinates and the combination run here, in JAX
    cluster = None if cluster is None else load_cluster_spec(cluster)
    sampler = check_options(shards, warmup, samples, chains, thin, combine, seed, target_accept)
    initial = initial_fit(from_fit) if from_fit is not None else None
    selection = Selection(q=q, q_index=q_index, phi=phi, frames=frames, dt=dt)
    if initial is not None:
        mode, gap, selection, config = defaults_from_fit(initial, mode, gap, selection, config)
    plan = make_plan(input, selection, mode, gap, config, shards, thin, initial)
    say(progress, plan.describe(sampler))

    def announce(c, what):
        say(progress, f"xpcsfit cmc: started {what}, dashboard {c.dashboard_link}")

    # The output is claimed before the cluster starts: a refused --out costs nothing.
    with claim_result_directory(out) as target, dask_client(client, scheduler, on_start=announce, cluster=cluster) as cl, \
            span("xpcsfit cmc", span_label(input, plan.ds["q"].values)):
        if initial is None:
            initial = _fit_first(cl, input, selection, plan, config, progress)
        run, results = _sample(cl, plan, initial, sampler, combine, progress)
        result = summarise(results, run)
        say(progress, report(result))
        if target is not None:
            result.out = write(target, result, run, started)
        result.summary["wall_time_s"] = time.perf_counter() - started
        return result


# ---------------------------------------------------------------- distributed work


def _fit_first(cl, input, selection: Selection, plan: Plan, config, progress) -> InitialFit:
    """Run the least-squares fit of the selection on the cluster."""
    say(progress, "xpcsfit cmc: least-squares fit first (initial point, noise level)")
    result = fit(input, **selection.kwargs(), mode=plan.cfg.mode, gap=plan.L, config=config, client=cl,
                 progress=False)
    initial = InitialFit(result, "least-squares fit run by cmc", ran_here=True)
    check_matches(initial, plan.ds)
    return initial


def tile_noise_and_lattice(tile, x, layout, mode, L, max_lag, thin) -> tuple[dict, dict]:
    """Worker task on one tile: its residual sums at x and its lattice points."""
    return tile_noise_sums(tile, x, layout, mode, L, max_lag), tile_lattice(tile, thin)


def _tile_pass(cl, plan: Plan, initial: FitResult) -> tuple[dict, list[dict]]:
    """One pass over the tiles: (noise model, every tile's lattice points, in tile order).

    Streamed: each tile is read once, in this pass, and not held afterwards.
    """
    layout, mode = plan.layout, plan.cfg.mode
    x = layout.join(initial.values, np.ravel(initial.contrast), np.ravel(initial.offset))
    max_lag = max(1, min(MAX_LAG, plan.tiles[0].size // 2))
    evaluator = DaskEvaluator(cl, plan.tiles, layout, mode, plan.L, storage="stream", span=("noise pass",))
    try:
        per_tile = evaluator.map_tiles("noise-lattice", tile_noise_and_lattice, x, layout, mode, plan.L,
                                       max_lag, plan.thin)
    finally:
        evaluator.close()
    noise = noise_model([p[0] for p in per_tile], layout.n_q, layout.n_bins, plan.thin, max_lag)
    return noise, [p[1] for p in per_tile]


def _noise_line(noise) -> str:
    return ("xpcsfit cmc: noise sd per bin " + _range(noise["sigma"])
            + "; correlated-noise inflation kappa " + ", ".join(f"{k:.3g}" for k in noise["kappa"])
            + f" (correlation length {', '.join(f'{c:g}' for c in noise['correlation_length'])} frames)")


def _shard_specs(plan: Plan, noise, initial: FitResult, sampler: SamplerSettings) -> list[ShardSpec]:
    var = noise["var"] * np.repeat(noise["kappa"], plan.layout.n_phi)
    w_start = plan.coords.from_theta(initial.values)
    return [ShardSpec(index=k, name=f"shard-{k:02d}", n_shards=plan.n_shards, coords=plan.coords, L=plan.L,
                      var=var, w_start=w_start, sampler=sampler)
            for k in range(plan.n_shards)]


def _sample(cl, plan: Plan, initial: InitialFit, sampler: SamplerSettings, combine: str, progress):
    """The noise pass and the K shard tasks: (the run as it went, the shard results)."""
    say(progress, "xpcsfit cmc: start " + ", ".join(
        f"{n}={v:.5g}" for n, v in zip(plan.coords.names, initial.result.values)))
    noise, pieces = _tile_pass(cl, plan, initial.result)
    say(progress, _noise_line(noise))
    levels = _level_precision(plan, noise, initial.result, sampler, pieces)
    choice = choose_shards(plan.n_shards, plan.n_lattice, levels, sum(cl.nthreads().values()))
    plan = replace(plan, n_shards=choice.n_shards)
    say(progress, choice.describe(plan.n_lattice))
    if (warning := choice.warning()) is not None:
        say(progress, f"xpcsfit cmc: warning: {warning}")
    specs = _shard_specs(plan, noise, initial.result, sampler)
    points = pad_to_common_shapes([shard_data(pieces, s.index, s.n_shards, plan.layout.n_bins) for s in specs])
    del pieces  # each shard's points now travel with its task
    run = CMCRun(plan=plan, sampler=sampler, combine=combine, noise=noise, initial=initial, shards=choice)
    return run, _run_shards(cl, specs, points, progress)


def _level_precision(plan: Plan, noise, initial: FitResult, sampler: SamplerSettings, pieces) -> dict:
    """Level name -> Laplace sd on all points relative to the least-squares value.

    Measured on one probe shard of ~PROBE_POINTS points (K0 = n_lattice / PROBE_POINTS
    of them): its target is prior^(1/K0) × 1/K0 of the likelihood, so K0 times its
    Hessian is about the full posterior's, and the full sd is the probe's over √K0.
    A few seconds here, instead of a Hessian of every point.
    """
    k0 = max(1, math.ceil(plan.n_lattice / PROBE_POINTS))
    probe = replace(plan, n_shards=k0)
    spec = _shard_specs(probe, noise, initial, sampler)[0]
    data = shard_data(pieces, 0, k0, plan.layout.n_bins)
    sd = laplace_sd(spec, data) / math.sqrt(k0)
    names = plan.coords.w_names
    return {n: float(sd[names.index(n)] / max(abs(spec.w_start[names.index(n)]), 1e-300))
            for n in plan.coords.level_names}


def _run_shards(cl, specs, points, progress) -> list[dict]:
    """Run every shard as one task (retried twice); results in shard order.

    A shard that still fails is reported as ``index``, ``name``, ``error``, never
    dropped silently.
    """
    import dask
    from distributed import span, wait

    name = task_name("cmc-shard", new_token())
    futures, results = {}, {}
    try:
        # The points travel inside their task on purpose (see the module note): no
        # "large graph" advice for a shard of a million points (~12 MiB).
        with span("shards"), dask.config.set({"distributed.admin.large-graph-warning-threshold": "1 GiB"}):
            for spec, data in zip(specs, points):
                f = cl.submit(run_shard, spec, data, retries=2, pure=False, key=(name, spec.index))
                futures[f] = spec
        t0 = time.perf_counter()
        pending = set(futures)
        while pending:
            try:
                with cl.as_current():  # wait() uses the current client, which may be another
                    done, pending = wait(list(pending), timeout=PROGRESS_EVERY_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for f in done:
                spec = futures[f]
                try:
                    r = f.result()
                except Exception as exc:  # after retries: reported, never dropped silently
                    r = {"index": spec.index, "name": spec.name, "error": f"{type(exc).__name__}: {exc}"}
                    say(progress, f"xpcsfit cmc: {spec.name} FAILED: {r['error']}")
                else:
                    say(progress, _shard_line(r, spec.coords.names, len(results) + 1, len(specs),
                                               time.perf_counter() - t0))
                results[spec.index] = r
            if not done and pending:
                running = sum(1 for keys in cl.processing().values() for k in keys if task_kind(k) == "cmc-shard")
                say(progress, f"xpcsfit cmc: {len(results)}/{len(specs)} shards done, {running} running, "
                               f"{time.perf_counter() - t0:.0f} s")
    finally:
        cl.cancel(list(futures))
    return [results[s.index] for s in specs]


def _shard_line(r, names, done, total, elapsed) -> str:
    """The progress line of a finished shard."""
    stats = comb.describe_all(names, r["theta"])  # the parameters (the summary adds J, gamma_dot)
    return (f"xpcsfit cmc: {r['name']} done in {r['wall_time_s']:.0f} s on {r['worker']}: "
            f"{r['n_points']:,} points, R-hat max {max(s['r_hat'] for s in stats.values()):.3f}, "
            f"bulk ESS min {min(s['ess_bulk'] for s in stats.values()):.0f}, "
            f"{int(r['diverging'].sum())} divergences [{done}/{total} done, {elapsed:.0f} s]")


def _range(a) -> str:
    a = np.asarray(a, float)
    return f"{a.min():.3g}" if np.ptp(a) == 0 else f"{a.min():.3g}-{a.max():.3g}"
