"""Evaluators: the seam between the solver and the data (DESIGN.md §5).

Both evaluators present ``normal_equations(x)`` and ``costs(xs)`` to the solver and
count their data passes; neither knows anything of trust regions.

- :class:`InProcessEvaluator` holds the tiles in this process (tests, small data).
- :class:`DaskEvaluator` loads the tiles onto dask.distributed workers once, holds them
  there as futures, and per pass sends only x (broadcast once per worker) and gets back
  one reduced set of sums (O(p²) numbers per tile, tree-reduced on the workers in a
  fixed order, so the result does not depend on the number of workers).
"""

from __future__ import annotations

import time
import uuid
from functools import reduce
from operator import add

import numpy as np

from ._kernel import BlockSums, ParameterLayout, Tile, tile_block_sums, tile_costs, tile_lag_sums
from ._solver import NormalEquations
from ._tiles import TileSpec

_FAN_IN = 8


def _to_normal_equations(sums: BlockSums) -> NormalEquations:
    jtj, jtr = sums.dense()
    return NormalEquations(jtj=jtj, jtr=jtr, cost=float(sums.cost), n=int(sums.n))


def _sum(*parts):
    return reduce(add, parts)


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

    def block_sums(self, x) -> BlockSums:
        self.normal_passes += 1
        return _sum(*[tile_block_sums(t, x, self.layout, self.mode, self.L) for t in self.tiles])

    def normal_equations(self, x) -> NormalEquations:
        return _to_normal_equations(self.block_sums(x))

    def costs(self, xs) -> np.ndarray:
        self.cost_passes += 1
        return np.sum([tile_costs(t, xs, self.layout, self.mode, self.L) for t in self.tiles], axis=0)

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


def _on_tile(func, item, *args):
    """Worker task: ``func(tile, *args)``, loading the tile first when streaming."""
    tile = item.load() if isinstance(item, TileSpec) else item
    return func(tile, *args)


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
        summed memory limit, else stream.

    Raises
    ------
    XpcsfitError
        Whatever a tile load raised (e.g. InputError for non-finite c2), re-raised here.
    """

    HOLD_FRACTION = 0.4

    def __init__(self, client, specs, layout: ParameterLayout, mode: str, L: float,
                 storage: str = "auto"):
        from distributed import wait

        self.client = client
        self.layout, self.mode, self.L = layout, mode, float(L)
        self.normal_passes = 0
        self.cost_passes = 0
        self.pass_seconds: list[float] = []
        self.bytes_to_workers = 0
        self.bytes_from_workers = 0
        self._token = uuid.uuid4().hex[:8]
        self.tile_bytes = sum(s.nbytes for s in specs)
        self.storage = self._choose_storage(storage)
        self.bin_starts = [s.bin_start for s in specs]
        if self.storage == "held":
            self.tiles = [client.submit(TileSpec.load, s, key=f"xpcsfit-load-tile-{self._token}-{i}")
                          for i, s in enumerate(specs)]
        else:
            self.tiles = client.scatter(list(specs), hash=False)
        wait(self.tiles)
        for f in self.tiles:
            if f.status == "error":
                f.result()  # re-raises the load's exception here
        # Compile counters are per worker process and cumulative; keep the baseline so the
        # result reports what this fit compiled, and what it compiled once warm.
        self._compiled_at_start = self.compilations()
        self._compiled_when_warm: dict | None = None

    def _choose_storage(self, storage: str) -> str:
        if storage == "hold":
            return "held"
        if storage == "stream":
            return "streamed"
        limits = [w.get("memory_limit") or 0 for w in self.client.scheduler_info()["workers"].values()]
        if not limits or min(limits) == 0:
            return "held"  # no memory limit set on the workers
        return "held" if self.tile_bytes <= self.HOLD_FRACTION * sum(limits) else "streamed"

    @property
    def n_workers(self) -> int:
        return max(1, len(self.client.scheduler_info()["workers"]))

    def _pass(self, name: str, func, x):
        started = time.perf_counter()
        pass_id = self.normal_passes + self.cost_passes
        x = np.asarray(x, float)
        self.bytes_to_workers += x.nbytes * self.n_workers
        x_future = self.client.scatter(x, broadcast=True, hash=False)
        prefix = f"xpcsfit-{name}-{self._token}-{pass_id}"
        level = [
            self.client.submit(_on_tile, func, tile, x_future, self.layout, self.mode, self.L,
                               key=f"{prefix}-tile-{i}")
            for i, tile in enumerate(self.tiles)
        ]
        depth = 0
        while len(level) > 1:
            level = [
                self.client.submit(_sum, *level[i : i + _FAN_IN], key=f"{prefix}-reduce-{depth}-{i}")
                for i in range(0, len(level), _FAN_IN)
            ]
            depth += 1
        result = level[0].result()
        self.bytes_from_workers += _nbytes(result)
        del x_future
        self.pass_seconds.append(time.perf_counter() - started)
        if self._compiled_when_warm is None and self.normal_passes and self.cost_passes:
            self._compiled_when_warm = self.compilations()  # every kernel has run once
        return result

    def block_sums(self, x) -> BlockSums:
        self.normal_passes += 1
        return self._pass("normal-equations", tile_block_sums, x)

    def normal_equations(self, x) -> NormalEquations:
        return _to_normal_equations(self.block_sums(x))

    def costs(self, xs) -> np.ndarray:
        self.cost_passes += 1
        return self._pass("costs", tile_costs, np.atleast_2d(xs))

    def lag_sums(self, n_lags: int):
        parts = self.map_tiles(tile_lag_sums)
        return merge_lag_sums(parts, self.layout.n_bins, self.layout.n_phi, n_lags, self.bin_starts)

    def map_tiles(self, func, *args):
        """Run ``func(tile, *args)`` on the workers for every tile; gather results in order."""
        futures = [self.client.submit(_on_tile, func, t, *args,
                                      key=f"xpcsfit-{func.__name__}-{self._token}-{i}")
                   for i, t in enumerate(self.tiles)]
        return self.client.gather(futures)

    def compilations(self) -> dict:
        """Compiled kernel variants per worker address (cumulative over the process)."""
        return self.client.run(kernel_compilations)

    @staticmethod
    def _added(now: dict, before: dict) -> dict:
        return {w: n - before.get(w, 0) for w, n in now.items()}

    def stats(self) -> dict:
        """What the engine did, for the result's ``engine`` record."""
        passes = max(1, self.normal_passes + self.cost_passes)
        now = self.compilations()
        warm = self._compiled_when_warm or now
        return {
            "n_tiles": len(self.tiles),
            "storage": self.storage,
            "tile_bytes_total": int(self.tile_bytes),
            "normal_passes": self.normal_passes,
            "cost_passes": self.cost_passes,
            "pass_seconds": [round(v, 4) for v in self.pass_seconds],
            "bytes_to_workers_per_pass": self.bytes_to_workers / passes,
            "bytes_from_workers_per_pass": self.bytes_from_workers / passes,
            "compilations": self._added(now, self._compiled_at_start),
            "compilations_after_warmup": self._added(now, warm),
        }

    def close(self):
        self.client.cancel(self.tiles)
        self.tiles = []


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, BlockSums):
        return sum(np.asarray(v).nbytes for v in (value.A, value.B, value.C, value.g_theta, value.g_bin)) + 16
    return 8
