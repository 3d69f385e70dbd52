"""Evaluators: the seam between the solver and the data (DESIGN.md §5).

Both evaluators present ``normal_equations(x)`` and ``costs(xs)`` to the solver
(:class:`~xpcsfit.engine.sums.Evaluator`) and count their data passes; neither knows
anything of trust regions. What a pass computes is written once, in
:class:`TileEvaluator`; the two differ only in where the per-tile kernel runs (the
``_map`` / ``_map_reduce`` seam):

- :class:`InProcessEvaluator` holds the tiles in this process (small fits, a fit run
  whole inside one worker task, tests).
- :class:`DaskEvaluator` groups the tiles into *parts*, loads each part onto a
  dask.distributed worker once (``hold``) or reads it from its source every pass
  (``stream``), and per pass sends only x (inside each part's task) and gets back one
  set of sums per part.

Sums are added over a fixed tree, and a part is an aligned subtree of it
(:mod:`xpcsfit.engine.parts`), so the result is bit for bit the same whatever the number
of parts or workers.

On Dask, every pass runs in a dashboard span and its tasks have readable keys
(:mod:`xpcsfit.engine.spans`): ``("xpcsfit-<kind>-<token>-pass-<n>", part)``, kinds
"load", "lag-sums", "normal-equations", "costs" and those of :meth:`TileEvaluator.map_tiles`;
:meth:`TileEvaluator.phase` opens a span of its own for the passes in it.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from xpcsfit.engine.cluster import workers_info
from xpcsfit.engine.kernel import (
    Tile,
    TilePlace,
    add_lag_sums,
    compiled_variants,
    tile_block_sums,
    tile_costs,
    tile_lag_sums,
)
from xpcsfit.engine.memory import shortfall, worker_memory, workers_dying
from xpcsfit.engine.parts import (
    keep_part,
    load_part,
    part_map,
    part_size,
    part_sum,
    tree_sum,
)
from xpcsfit.engine.spans import (
    current_span,
    inside,
    new_token,
    span_annotation,
    task_name,
)
from xpcsfit.engine.sums import BlockSums, NormalEquations
from xpcsfit.errors import ConfigError
from xpcsfit.model import enable_float64
from xpcsfit.parameters import ParameterLayout


class TileEvaluator:
    """One pass over the tiles, written once: block sums, normal equations, costs, lag sums.

    Subclasses say where ``func(tile, *args)`` runs: :meth:`_map` returns its results in
    tile order, :meth:`_map_reduce` their :func:`tree_sum`; both get the pass's kind
    (which names its Dask tasks, see :func:`xpcsfit.engine.spans.task_name`).

    Parameters
    ----------
    places : list of TilePlace
        The tiles (or their specs), in the fixed order of the reduction tree.
    layout : ParameterLayout
    mode : {"static", "laminar_flow"}
    L : float
        Gap, Å.

    Attributes
    ----------
    normal_passes, cost_passes, other_passes : int
        Passes made: by the solver (normal equations, costs) and outside it
        (:meth:`map_tiles`: start values, fitted output).
    last_block_sums : (x, BlockSums) or None
        The sums of the latest normal-equations pass and the x they are at.
    bin_weight : ndarray (n_bins,) or None
        Weight w_k = 1/σ_k² of each bin's points in the normal-equation and cost passes
        (weighted least squares; see :mod:`xpcsfit.leastsq.noise`); None: all 1. Set it
        before the solver's first pass.
    """

    def __init__(self, places: list[TilePlace], layout: ParameterLayout, mode: str, L: float):
        self.layout, self.mode, self.L = layout, mode, float(L)
        self.n_tiles = len(places)
        self.bin_starts = [p.bin_start for p in places]
        self.normal_passes = 0
        self.cost_passes = 0
        self.other_passes = 0
        self.last_block_sums: tuple[np.ndarray, BlockSums] | None = None
        self.bin_weight: np.ndarray | None = None

    def _pass_stats(self, n_parts: int, to_workers: float, from_workers: float,
                    compilations: dict, after_warmup: dict) -> dict:
        """The ``engine`` record both evaluators share; each passes its own parts,
        bytes moved per pass and JIT compilations (by worker)."""
        return {
            "n_tiles": self.n_tiles,
            "n_parts": n_parts,
            "storage": self.storage,
            "tile_bytes_total": int(self.tile_bytes),
            "normal_passes": self.normal_passes,
            "cost_passes": self.cost_passes,
            "other_passes": self.other_passes,
            "pass_seconds": [round(v, 4) for v in self.pass_seconds],
            "bytes_to_workers_per_pass": to_workers,
            "bytes_from_workers_per_pass": from_workers,
            "compilations": compilations,
            "compilations_after_warmup": after_warmup,
        }

    def _map(self, kind: str, func, *args) -> list:
        raise NotImplementedError

    def _map_reduce(self, kind: str, func, x: np.ndarray):
        raise NotImplementedError

    @property
    def passes(self) -> int:
        """Passes made so far, of every kind: the number of the latest (1-based)."""
        return self.normal_passes + self.cost_passes + self.other_passes

    def phase(self, name: str):
        """Context: the passes made in it belong to the phase ``name`` of the work
        ("start values", "iteration 3", "write outputs"). On Dask a span of that name
        (below the evaluator's) that the dashboard shows; in process, nothing."""
        return contextlib.nullcontext()

    def block_sums(self, x) -> BlockSums:
        """Block sums at x (P,), also kept with x as ``last_block_sums``."""
        self.normal_passes += 1
        x = np.asarray(x, float)
        sums = self._map_reduce("normal-equations", tile_block_sums, x)
        self.last_block_sums = (np.array(x, float), sums)
        return sums

    def normal_equations(self, x) -> NormalEquations:
        """JᵀJ, Jᵀr, cost and n at x (P,): one pass."""
        return self.block_sums(x).normal_equations()

    def costs(self, xs) -> np.ndarray:
        """Cost ½ Σ r² at each row of xs (m, P): one pass; returns (m,)."""
        self.cost_passes += 1
        return self._map_reduce("costs", tile_costs, np.atleast_2d(np.asarray(xs, float)))

    def map_tiles(self, kind: str, func, *args) -> list:
        """``func(tile, *args)`` for every tile, in tile order; counted in ``other_passes``.

        ``kind`` names the pass in its task keys, lower-case words joined by "-" (e.g.
        "write-outputs": keys ``("xpcsfit-write-outputs-<token>-pass-<n>", part)``).
        """
        self.other_passes += 1
        return self._map(kind, func, *args)

    def lag_sums(self, n_lags: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Σ c2, point counts and Σ c2² per bin and lag, (n_bins, n_lags) each (start
        values and the noise level)."""
        per_tile = self.map_tiles("lag-sums", tile_lag_sums)
        return add_lag_sums(per_tile, self.bin_starts, self.layout.n_bins, self.layout.n_phi, n_lags)


class InProcessEvaluator(TileEvaluator):
    """Evaluate the tiles in this process, one after another.

    The same kernels and the same fixed reduction tree as :class:`DaskEvaluator`
    (whose parts are aligned subtrees of it), so a fit gives the same sums either way.
    It holds every tile: its memory is ``tile_bytes`` (the padded tiles) plus one tile's
    kernel workspace.

    Parameters
    ----------
    tiles : list of Tile
        In the fixed order of the reduction tree (a fit's: from
        :func:`~xpcsfit.engine.tiles.load_tiles`).
    layout, mode, L
        As for :class:`TileEvaluator`.
    """

    storage = "hold"
    n_workers = 1

    def __init__(self, tiles: list[Tile], layout: ParameterLayout, mode: str, L: float):
        enable_float64()
        super().__init__(tiles, layout, mode, L)
        self.tiles = list(tiles)
        self.tile_bytes = sum(t.c2.nbytes + t.weight.nbytes for t in self.tiles)
        self.pass_seconds: list[float] = []
        self._compiled_at_start = compiled_variants()
        self._compiled_when_warm: int | None = None

    def _map(self, kind, func, *args) -> list:
        return [func(t, *args) for t in self.tiles]

    def _map_reduce(self, kind, func, x):
        started = time.perf_counter()
        result = tree_sum(self._map(kind, func, x, self.layout, self.mode, self.L, self.bin_weight))
        self.pass_seconds.append(time.perf_counter() - started)
        if self._compiled_when_warm is None and self.normal_passes and self.cost_passes:
            self._compiled_when_warm = compiled_variants()  # every kernel has run once
        return result

    def stats(self) -> dict:
        """What the engine did, for the result's ``engine`` record (the keys of
        :meth:`DaskEvaluator.stats`; the one "worker" is this process, nothing travels)."""
        now = compiled_variants()
        warm = now if self._compiled_when_warm is None else self._compiled_when_warm
        return self._pass_stats(1, 0.0, 0.0, {"in process": now - self._compiled_at_start},
                                {"in process": now - warm})

    def close(self):
        self.tiles = []


class DaskEvaluator(TileEvaluator):
    """Evaluate tiles on dask.distributed workers, held in memory or streamed.

    Parameters
    ----------
    client : distributed.Client
        A client (in a task: the one from ``distributed.worker_client``).
    specs : list of TileSpec
        The tiles, in a fixed order (see :func:`xpcsfit.engine.tiles.plan_tiles`).
    layout, mode, L
        As for :class:`TileEvaluator`.
    storage : {"auto", "hold", "stream"}
        The config's ``memory``. "hold": load every tile once and keep it on a worker.
        "stream": keep only the small specs on the workers and read each tile from its
        source in every pass, so a worker's memory is bounded by a few tiles whatever
        the data size. "auto": hold when the padded tiles take at most
        :data:`HOLD_FRACTION` of the workers' summed memory limit and fit beside the
        kernel workspace (see :func:`xpcsfit.engine.memory.shortfall`), else stream.
        The attribute ``storage`` is the choice made ("hold" or "stream").
    span : tuple of str, optional
        Tags of the dashboard span that this evaluator's tasks run in, below the span
        current at its creation (e.g. ``("xpcsfit fit", "run42.hdf q=0.005555")``; see
        :mod:`xpcsfit.engine.spans`). The parts are loaded in its child span "load
        tiles", and :meth:`phase` opens others. None: the span current at its creation.

    Notes
    -----
    The tiles are grouped into parts of :func:`part_size` consecutive tiles, each part
    placed on one worker (round robin; a part whose worker dies is reloaded elsewhere by
    Dask). One pass is one task per part: x goes out inside each task, one set of sums
    per part comes back, so the bytes and scheduler messages per pass depend on the
    number of workers, not on the number of points. Task keys: ``("xpcsfit-load-<token>",
    part)`` for the parts, ``("xpcsfit-<kind>-<token>-pass-<n>", part)`` per pass.

    Raises
    ------
    XpcsfitError
        Whatever a tile load raised (e.g. InputError for non-finite c2), re-raised here.
    ConfigError
        Before any tile is loaded, if a worker's memory_limit is too small for one tile
        and its kernel workspace (or, held, for its tiles); and, in place of Dask's
        KilledWorker, if worker processes kept dying while loading or evaluating tiles.
    """

    HOLD_FRACTION = 0.4

    def __init__(self, client, specs, layout: ParameterLayout, mode: str, L: float,
                 storage: str = "auto", span: tuple[str, ...] | None = None):
        from distributed import wait

        super().__init__(specs, layout, mode, L)
        self.client = client
        self.pass_seconds: list[float] = []
        self.bytes_to_workers = 0
        self.bytes_from_workers = 0
        self._token = new_token()
        # Kept and re-entered at every submission: the span outlives any one call.
        self._span = span_annotation(*span) if span else current_span()
        self.tile_bytes = sum(s.nbytes for s in specs)
        self._tile_shape = (specs[0].size, specs[0].phi.size) if specs else (0, 0)
        info = workers_info(client)
        workers = sorted(info)
        self.n_workers = max(1, len(workers))  # at the start
        self._limits = {w: info[w].get("memory_limit") or 0 for w in workers}
        size = part_size(len(specs), len(workers))
        groups = [list(specs[i : i + size]) for i in range(0, len(specs), size)]
        # A worker that dies meanwhile is left out (Dask recomputes its tasks elsewhere).
        memory = client.run(worker_memory, workers=workers, on_error="ignore") if workers else {}
        self.storage = self._choose_storage(storage, groups, workers, memory)
        self.parts = []
        place = load_part if self.storage == "hold" else keep_part
        name = task_name("load", self._token)
        with self.phase("load tiles"):
            for i, group in enumerate(groups):
                where = dict(workers=[workers[i % len(workers)]], allow_other_workers=True) if workers else {}
                self.parts.append(self._submit(place, group, key=(name, i), **where))
        if workers:
            self._release_placement([f.key for f in self.parts])
        pending = set(self.parts)
        with client.as_current():  # wait() uses the current client, which may be another
            while pending and not any(f.status == "error" for f in self.parts):
                _, pending = wait(pending, return_when="FIRST_COMPLETED")
        failed = [f for f in self.parts if f.status == "error"]
        if failed:
            try:
                with self._workers_dying("loading the tiles", self.parts):
                    failed[0].result()  # re-raises the load's exception here
            finally:
                client.cancel(self.parts)  # the other parts are not needed now
        # Compile counters are per worker process and cumulative; keep the baseline (from
        # before the loading, which compiles nothing) so the result reports what this fit
        # compiled, and what it compiled once warm.
        self._compiled_at_start = {w: n for w, (_, n) in memory.items()}
        self._compiled_when_warm: dict | None = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """Context: the passes made in it run in the span ``name``, a child of the
        evaluator's current span (phases nest)."""
        outer = self._span
        with inside(outer):
            self._span = span_annotation(name)
        try:
            yield
        finally:
            self._span = outer

    def _submit(self, func, *args, **kwargs):
        """``client.submit``, in the current span."""
        with inside(self._span):
            return self.client.submit(func, *args, **kwargs)

    def _release_placement(self, keys: list) -> None:
        """Drop the parts' worker restrictions once the scheduler has placed them.

        They only spread the parts evenly at the start. Kept, a part lost while no
        worker was running (every worker died, or the only one) would wait in Dask's
        no-worker state for a worker of its old address forever: new workers do not
        take it, allow_other_workers notwithstanding (dask/distributed#7346).
        """
        scheduler = self.client.scheduler
        # The submissions travel on another connection: wait until the scheduler has them.
        deadline = time.monotonic() + 60
        while None in self.client.sync(scheduler.get_task_status, keys=keys).values():
            if time.monotonic() > deadline:
                raise RuntimeError("internal error: the scheduler did not receive the part tasks in 60 s")
            time.sleep(0.005)
        self.client.sync(scheduler.set_restrictions, worker=dict.fromkeys(keys))

    def _choose_storage(self, storage: str, groups: list, workers: list, memory: dict) -> str:
        """Return "hold" or "stream" (see the class docstring), checked against the workers' memory.

        ``memory`` is :func:`~xpcsfit.engine.memory.worker_memory` of each worker,
        {address: (rss, compiled)}.

        Raises
        ------
        ConfigError
            If a worker's memory_limit cannot take one tile and its kernel workspace
            ("stream"), or the tiles it would hold as well ("hold").
        """
        limits = list(self._limits.values())

        def problem(chosen):
            return shortfall(chosen, groups, workers, self._limits, memory, self._tile_shape)

        if storage == "auto" and (not limits or min(limits) == 0):
            storage = "hold"  # no memory limit set on the workers
        elif storage == "auto":
            fits = self.tile_bytes <= self.HOLD_FRACTION * sum(limits) and problem("hold") is None
            storage = "hold" if fits else "stream"
        message = problem(storage)
        if message is not None:
            raise ConfigError(message)
        return storage

    def _workers_dying(self, what: str, futures: list):
        """Context: KilledWorker while ``what`` becomes a ConfigError (see
        :func:`xpcsfit.engine.memory.workers_dying`)."""
        tile_mib = self.tile_bytes / max(1, self.n_tiles) / 2**20
        return workers_dying(self.client, what, futures, self._limits, self._tile_shape, tile_mib)

    def _map_reduce(self, kind, func, x):
        started = time.perf_counter()
        name = task_name(kind, self._token, self.passes)
        self.bytes_to_workers += x.nbytes * len(self.parts)  # x (P or 4 × P numbers) goes in each task
        futures = [self._submit(part_sum, func, part, x, self.layout, self.mode, self.L, self.bin_weight,
                                key=(name, i))
                   for i, part in enumerate(self.parts)]
        with self._workers_dying(f"computing {kind.replace('-', ' ')}", futures):
            sums = self.client.gather(futures)
        self.bytes_from_workers += sum(getattr(s, "nbytes", 8) for s in sums)
        result = tree_sum(sums)
        del futures
        self.pass_seconds.append(time.perf_counter() - started)
        if self._compiled_when_warm is None and self.normal_passes and self.cost_passes:
            self._compiled_when_warm = self.compilations()  # every kernel has run once
        return result

    def _map(self, kind, func, *args) -> list:
        name = task_name(kind, self._token, self.passes)
        futures = [self._submit(part_map, func, part, *args, key=(name, i)) for i, part in enumerate(self.parts)]
        with self._workers_dying(f"running {kind.replace('-', ' ')}", futures):
            gathered = self.client.gather(futures)
        return [r for results in gathered for r in results]

    def compilations(self) -> dict:
        """Compiled kernel variants per worker address (cumulative over the process); a
        worker that dies meanwhile is left out."""
        return self.client.run(compiled_variants, on_error="ignore")

    @staticmethod
    def _added(now: dict, before: dict) -> dict:
        return {w: n - before.get(w, 0) for w, n in now.items()}

    def stats(self) -> dict:
        """What the engine did, for the result's ``engine`` record."""
        passes = max(1, self.normal_passes + self.cost_passes)
        now = self.compilations()
        warm = self._compiled_when_warm or now
        return self._pass_stats(len(self.parts), self.bytes_to_workers / passes,
                                self.bytes_from_workers / passes,
                                self._added(now, self._compiled_at_start), self._added(now, warm))

    def close(self):
        self.client.cancel(self.parts)
        self.parts = []
