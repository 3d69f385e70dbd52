"""Where a fit runs: in this process (or whole inside one Dask task) or on a cluster.

:func:`choose_in_process` decides from ``fit``'s ``in_process`` and the number of points;
:func:`fit_evaluator` starts what was chosen: an :class:`InProcessEvaluator` over the
tiles loaded here, or a :class:`DaskEvaluator` on the client :func:`dask_client` gives.
"""

from __future__ import annotations

import contextlib

from xpcsfit.engine.cluster import dask_client
from xpcsfit.engine.evaluator import DaskEvaluator, InProcessEvaluator
from xpcsfit.engine.spans import span_label
from xpcsfit.engine.tiles import load_tiles
from xpcsfit.errors import ConfigError
from xpcsfit.progress import say

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
def fit_evaluator(local: bool, input, cfg, plan, progress, client, scheduler, cluster):
    """Yield the fit's evaluator (tiles loaded) and where it runs (fit.json's
    ``provenance.cluster``): in process, or on the client :func:`dask_client` gives.

    ``plan`` is the driver's plan (``ds``, ``specs``, ``layout``, ``L``); ``local`` from
    :func:`choose_in_process`."""
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
