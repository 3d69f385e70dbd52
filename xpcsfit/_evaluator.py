"""Evaluators: the seam between the solver and the data (DESIGN.md §5).

Both evaluators present ``normal_equations(x)`` and ``costs(xs)`` to the solver and
count their data passes; neither knows anything of trust regions.

- :class:`InProcessEvaluator` holds the tiles in this process (tests, small data).
- :class:`DaskEvaluator` groups the tiles into parts, loads each part onto a
  dask.distributed worker once (or streams it from its source every pass), and per pass
  sends only x (inside each part's task) and gets back one set of sums per part.

Sums are added over a fixed tree (groups of :data:`FAN_IN` tiles, then groups of FAN_IN
of those, …). A part is an aligned subtree of it, so the result is bit for bit the same
whatever the number of parts or workers, and in process.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from functools import reduce
from operator import add

import numpy as np

from ._cluster import workers_info
from ._errors import ConfigError
from ._kernel import BlockSums, ParameterLayout, Tile, tile_block_sums, tile_costs, tile_lag_sums
from ._solver import NormalEquations
from ._tiles import TileSpec

FAN_IN = 2
MiB = 2**20

# Peak memory of a worker for one tile, in units of the tile's padded bytes (c2 float32
# and weight float64), measured above an idle worker at 1024 frames × 4 phi: loading it
# 2.5×, block sums 3.6×, costs 4.1×, writing its fitted and residual chunks 7.3× (the
# float64 model and its float32 copies).
WORKSPACE_FACTOR = 8
# XLA compiling the tile kernels in a fresh worker: measured up to +167 MiB of process
# memory (block sums), which the heap keeps afterwards, so a worker that has compiled
# needs no more.
COMPILE_BYTES = 256 * MiB


def _to_normal_equations(sums: BlockSums) -> NormalEquations:
    jtj, jtr = sums.dense()
    return NormalEquations(jtj=jtj, jtr=jtr, cost=float(sums.cost), n=int(sums.n))


def tree_sum(values: list):
    """Sum ``values`` over the fixed reduction tree: groups of FAN_IN, left to right."""
    level = list(values)
    while len(level) > 1:
        level = [reduce(add, level[i : i + FAN_IN]) for i in range(0, len(level), FAN_IN)]
    return level[0]


def merge_lag_sums(parts, n_bins: int, n_phi: int, n_lags: int, bin_starts):
    """Add per-tile lag sums (see :func:`~xpcsfit._kernel.tile_lag_sums`) into
    (n_bins, n_lags) sums and counts."""
    sums = np.zeros((n_bins, n_lags))
    counts = np.zeros((n_bins, n_lags))
    for (lag0, s, c), b0 in zip(parts, bin_starts):
        n = c.size
        sums[b0 : b0 + n_phi, lag0 : lag0 + n] += s
        counts[b0 : b0 + n_phi, lag0 : lag0 + n] += c
    return sums, counts


class InProcessEvaluator:
    """Evaluate the tiles in this process, one after another.

    Parameters
    ----------
    tiles : list of Tile
    layout : ParameterLayout
    mode : {"static", "laminar_flow"}
    L : float
        Gap, Å.
    """

    def __init__(self, tiles: list[Tile], layout: ParameterLayout, mode: str, L: float):
        self.tiles = list(tiles)
        self.layout, self.mode, self.L = layout, mode, float(L)
        self.normal_passes = 0
        self.cost_passes = 0
        self.last_block_sums: tuple[np.ndarray, BlockSums] | None = None

    def block_sums(self, x) -> BlockSums:
        """Block sums at x, also kept with x as ``last_block_sums``."""
        self.normal_passes += 1
        sums = tree_sum([tile_block_sums(t, x, self.layout, self.mode, self.L) for t in self.tiles])
        self.last_block_sums = (np.array(x, float), sums)
        return sums

    def normal_equations(self, x) -> NormalEquations:
        return _to_normal_equations(self.block_sums(x))

    def costs(self, xs) -> np.ndarray:
        self.cost_passes += 1
        return tree_sum([tile_costs(t, xs, self.layout, self.mode, self.L) for t in self.tiles])

    def lag_sums(self, n_lags: int):
        parts = [tile_lag_sums(t) for t in self.tiles]
        return merge_lag_sums(parts, self.layout.n_bins, self.layout.n_phi, n_lags,
                              [t.bin_start for t in self.tiles])

    def map_tiles(self, func, *args):
        """Apply ``func(tile, *args)`` to every tile; returns the list of results."""
        return [func(t, *args) for t in self.tiles]

    def close(self):
        self.tiles = []


def kernel_compilations() -> int:
    """Compiled variants of the tile kernels in this process (one per shape and mode)."""
    from ._kernel import _tile_block_sums, _tile_costs, _tile_model

    return sum(f._cache_size() for f in (_tile_block_sums, _tile_costs, _tile_model))


def worker_memory() -> tuple[int, int]:
    """Worker check: (resident bytes of this process, compiled tile-kernel variants)."""
    import psutil

    return psutil.Process().memory_info().rss, kernel_compilations()


def memory_threshold() -> float:
    """Fraction of memory_limit at which a Dask worker stops running tasks.

    The worker pauses at ``distributed.worker.memory.pause`` (a paused worker never runs
    the fit's next pass), else the nanny restarts it at ``…terminate``.
    """
    import dask

    for key in ("pause", "terminate"):
        value = dask.config.get(f"distributed.worker.memory.{key}")
        if value:
            return float(value)
    return 1.0


def _load_part(specs: list[TileSpec]) -> list[Tile]:
    """Worker task: load the tiles of one part (held storage)."""
    return [s.load() for s in specs]


def _keep_part(specs: list[TileSpec]) -> list[TileSpec]:
    """Worker task: keep the specs of one part (streamed storage).

    A task rather than a scatter, so that Dask can recompute it if its worker dies.
    """
    return specs


def _part_sum(func, part: list, *args):
    """Worker task: ``func(tile, *args)`` over one part's tiles, tree-summed.

    A streamed part (specs) loads one tile at a time, so a worker holds one tile plus
    the small per-tile sums whatever the part's size.
    """
    return tree_sum([func(t.load() if isinstance(t, TileSpec) else t, *args) for t in part])


def _part_map(func, part: list, *args) -> list:
    """Worker task: ``[func(tile, *args) for tile in part]`` (loading streamed tiles)."""
    return [func(t.load() if isinstance(t, TileSpec) else t, *args) for t in part]


PARTS_PER_WORKER = 2


def part_size(n_tiles: int, n_workers: int) -> int:
    """Tiles per part: the largest power of FAN_IN that leaves PARTS_PER_WORKER parts
    per worker (for balance), or 1.

    Parts are aligned subtrees of the reduction tree (see :func:`tree_sum`), and the
    number of tasks per pass is at most about FAN_IN·PARTS_PER_WORKER per worker
    however many tiles (points) there are.
    """
    size = 1
    wanted = PARTS_PER_WORKER * max(1, n_workers)
    while -(-n_tiles // (size * FAN_IN)) >= wanted:
        size *= FAN_IN
    return size


class DaskEvaluator:
    """Evaluate tiles on dask.distributed workers, held in memory or streamed.

    Parameters
    ----------
    client : distributed.Client
        A client (in a task: the one from ``distributed.worker_client``).
    specs : list of TileSpec
        The tiles, in a fixed order (see :func:`xpcsfit._tiles.plan_tiles`).
    layout, mode, L
        As for :class:`InProcessEvaluator`.
    storage : {"auto", "hold", "stream"}
        "hold": load every tile once and keep it on a worker. "stream": keep only the
        small specs on the workers and read each tile from its source in every pass, so
        a worker's memory is bounded by a few tiles whatever the data size. "auto":
        hold when the padded tiles take at most :data:`HOLD_FRACTION` of the workers'
        summed memory limit and fit beside the kernel workspace (see
        :meth:`_shortfall`), else stream.

    Notes
    -----
    The tiles are grouped into parts of :func:`part_size` consecutive tiles, each part
    placed on one worker (round robin; a part whose worker dies is reloaded elsewhere by
    Dask). One pass is one task per part: x goes out inside each task, one set of sums
    per part comes back, so the bytes and scheduler messages per pass depend on the
    number of workers, not on the number of points.

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
                 storage: str = "auto"):
        from distributed import wait

        self.client = client
        self.layout, self.mode, self.L = layout, mode, float(L)
        self.normal_passes = 0
        self.cost_passes = 0
        self.last_block_sums: tuple[np.ndarray, BlockSums] | None = None
        self.other_passes = 0
        self.pass_seconds: list[float] = []
        self.bytes_to_workers = 0
        self.bytes_from_workers = 0
        self._token = uuid.uuid4().hex[:8]
        self.n_tiles = len(specs)
        self.tile_bytes = sum(s.nbytes for s in specs)
        self.bin_starts = [s.bin_start for s in specs]
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
        place = _load_part if self.storage == "held" else _keep_part
        for i, group in enumerate(groups):
            where = dict(workers=[workers[i % len(workers)]], allow_other_workers=True) if workers else {}
            self.parts.append(client.submit(place, group, key=f"xpcsfit-part-{self._token}-{i}", **where))
        if workers:
            self._release_placement([f.key for f in self.parts])
        pending = set(self.parts)
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
        """Return "held" or "streamed" (see the class docstring), checked against the workers' memory.

        ``memory`` is :func:`worker_memory` of each worker, {address: (rss, compiled)}.

        Raises
        ------
        ConfigError
            If a worker's memory_limit cannot take one tile and its kernel workspace
            (streamed), or the tiles it would hold as well (held).
        """
        limits = list(self._limits.values())
        if storage == "auto" and (not limits or min(limits) == 0):
            storage = "hold"  # no memory limit set on the workers
        elif storage == "auto":
            fits = self.tile_bytes <= self.HOLD_FRACTION * sum(limits)
            fits = fits and self._shortfall("held", groups, workers, memory) is None
            storage = "hold" if fits else "stream"
        chosen = "held" if storage == "hold" else "streamed"
        problem = self._shortfall(chosen, groups, workers, memory)
        if problem is not None:
            raise ConfigError(problem)
        return chosen

    def _shortfall(self, storage: str, groups: list, workers: list, memory: dict) -> str | None:
        """Why some worker cannot run this fit within its memory_limit, or None.

        A worker needs, above what its process already uses: WORKSPACE_FACTOR × one
        tile's bytes, COMPILE_BYTES if it has not compiled a tile kernel yet, and (held)
        the tiles of the parts placed on it; all within :func:`memory_threshold` of its
        memory_limit. Workers without a limit are not checked.
        """
        size, n_phi = self._tile_shape
        one_tile = max((s.nbytes for g in groups for s in g), default=0)
        threshold = memory_threshold()
        for k, w in enumerate(workers):
            limit = self._limits[w]
            if not limit or w not in memory:
                continue
            rss, compiled = memory[w]
            held = sum(s.nbytes for g in groups[k :: len(workers)] for s in g) if storage == "held" else 0
            compile_bytes = 0 if compiled else COMPILE_BYTES
            need = WORKSPACE_FACTOR * one_tile + compile_bytes + held
            if rss + need <= threshold * limit:
                continue
            parts = [f"{WORKSPACE_FACTOR * one_tile / MiB:.0f} MiB for one tile and its kernel workspace"]
            if compile_bytes:
                parts.append(f"{compile_bytes / MiB:.0f} MiB to compile the kernels")
            if held:
                parts.append(f"{held / MiB:.0f} MiB of held tiles")
            fix = "choose a smaller tile (config tile: / --tile)"
            fix += ", stream the tiles (config memory: stream)" if held else ""
            return (f"tiles of {size} frames × {n_phi} phi need about {need / MiB:.0f} MiB on worker {w} "
                    f"({' + '.join(parts)}), but its memory_limit is {limit / MiB:.0f} MiB, it uses "
                    f"{rss / MiB:.0f} MiB already and stops running tasks at {threshold:.0%} of the "
                    f"limit: {fix} or give the workers a larger memory_limit")
        return None

    @contextlib.contextmanager
    def _workers_dying(self, what: str, futures: list):
        """Turn Dask's KilledWorker (a task's workers died, usually out of memory) into a
        ConfigError naming the settings that size a worker's memory; ``futures`` are
        cancelled then, so their tasks stop killing workers."""
        from distributed import KilledWorker

        try:
            yield
        except KilledWorker as exc:
            self.client.cancel(futures)
            size, n_phi = self._tile_shape
            limits = sorted({v for v in self._limits.values()})
            limit_text = ", ".join(f"{v / MiB:.0f} MiB" if v else "none" for v in limits) or "unknown"
            raise ConfigError(
                f"worker processes died {exc.allowed_failures + 1} times while {what} (task {exc.task!r}, "
                f"tiles of {size} frames × {n_phi} phi, {self.tile_bytes / max(1, self.n_tiles) / MiB:.1f} MiB "
                f"each); if they ran out of memory, choose a smaller tile (config tile: / --tile) or give the "
                f"workers a larger memory_limit (now {limit_text})"
            ) from None

    def _pass(self, name: str, func, x):
        started = time.perf_counter()
        pass_id = self.normal_passes + self.cost_passes
        x = np.asarray(x, float)  # small (P or 4 × P numbers): sent inside each part's task
        self.bytes_to_workers += x.nbytes * len(self.parts)
        futures = [
            self.client.submit(_part_sum, func, part, x, self.layout, self.mode, self.L,
                               key=f"xpcsfit-{name}-{self._token}-{pass_id}-part-{i}")
            for i, part in enumerate(self.parts)
        ]
        with self._workers_dying(f"computing {name}", futures):
            sums = self.client.gather(futures)
        self.bytes_from_workers += sum(_nbytes(s) for s in sums)
        result = tree_sum(sums)
        del futures
        self.pass_seconds.append(time.perf_counter() - started)
        if self._compiled_when_warm is None and self.normal_passes and self.cost_passes:
            self._compiled_when_warm = self.compilations()  # every kernel has run once
        return result

    def block_sums(self, x) -> BlockSums:
        """Block sums at x, also kept with x as ``last_block_sums``."""
        self.normal_passes += 1
        sums = self._pass("normal-equations", tile_block_sums, x)
        self.last_block_sums = (np.array(x, float), sums)
        return sums

    def normal_equations(self, x) -> NormalEquations:
        return _to_normal_equations(self.block_sums(x))

    def costs(self, xs) -> np.ndarray:
        self.cost_passes += 1
        return self._pass("costs", tile_costs, np.atleast_2d(xs))

    def lag_sums(self, n_lags: int):
        parts = self.map_tiles(tile_lag_sums)
        return merge_lag_sums(parts, self.layout.n_bins, self.layout.n_phi, n_lags, self.bin_starts)

    def map_tiles(self, func, *args):
        """Run ``func(tile, *args)`` on the workers for every tile; results in tile order.

        Counted as a data pass outside the solver (start values, fitted output).
        """
        self.other_passes += 1
        futures = [self.client.submit(_part_map, func, part, *args,
                                      key=f"xpcsfit-{func.__name__}-{self._token}-{self.other_passes}-{i}")
                   for i, part in enumerate(self.parts)]
        with self._workers_dying(f"running {func.__name__}", futures):
            gathered = self.client.gather(futures)
        return [r for results in gathered for r in results]

    def compilations(self) -> dict:
        """Compiled kernel variants per worker address (cumulative over the process); a
        worker that dies meanwhile is left out."""
        return self.client.run(kernel_compilations, on_error="ignore")

    @staticmethod
    def _added(now: dict, before: dict) -> dict:
        return {w: n - before.get(w, 0) for w, n in now.items()}

    def stats(self) -> dict:
        """What the engine did, for the result's ``engine`` record."""
        passes = max(1, self.normal_passes + self.cost_passes)
        now = self.compilations()
        warm = self._compiled_when_warm or now
        return {
            "n_tiles": self.n_tiles,
            "n_parts": len(self.parts),
            "storage": self.storage,
            "tile_bytes_total": int(self.tile_bytes),
            "normal_passes": self.normal_passes,
            "cost_passes": self.cost_passes,
            "other_passes": self.other_passes,
            "pass_seconds": [round(v, 4) for v in self.pass_seconds],
            "bytes_to_workers_per_pass": self.bytes_to_workers / passes,
            "bytes_from_workers_per_pass": self.bytes_from_workers / passes,
            "compilations": self._added(now, self._compiled_at_start),
            "compilations_after_warmup": self._added(now, warm),
        }

    def close(self):
        self.client.cancel(self.parts)
        self.parts = []

def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, BlockSums):
        return sum(np.asarray(v).nbytes for v in (value.A, value.B, value.C, value.g_theta, value.g_bin,
                                                   value.rss)) + 8
    return 8
