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

import uuid
from functools import reduce
from operator import add

import numpy as np

from ._kernel import BlockSums, ParameterLayout, Tile, tile_block_sums, tile_costs, tile_lag_sums
from ._solver import NormalEquations

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


class DaskEvaluator:
    """Evaluate tiles held on dask.distributed workers.

    Parameters
    ----------
    client : distributed.Client
        A client (in a task: the one from ``distributed.worker_client``).
    loads : list of dask.delayed.Delayed
        Tile loads in a fixed order (see :func:`xpcsfit._tiles.plan_tiles`).
    layout, mode, L
        As for :class:`InProcessEvaluator`.

    Raises
    ------
    XpcsfitError
        Whatever a tile load raised (e.g. InputError for non-finite c2), re-raised here.
    """

    def __init__(self, client, loads, layout: ParameterLayout, mode: str, L: float):
        from distributed import wait

        self.client = client
        self.layout, self.mode, self.L = layout, mode, float(L)
        self.normal_passes = 0
        self.cost_passes = 0
        self.bytes_out = 0
        self._token = uuid.uuid4().hex[:8]
        self.tiles = client.compute(loads)
        wait(self.tiles)
        for f in self.tiles:
            if f.status == "error":
                f.result()  # re-raises the load's exception here
        self.bin_starts = [b0 for b0 in client.gather(
            [client.submit(lambda t: t.bin_start, f, key=f"xpcsfit-bin-start-{self._token}-{i}")
             for i, f in enumerate(self.tiles)])]

    def _pass(self, name: str, func, x, reducer=_sum):
        pass_id = self.normal_passes + self.cost_passes
        x = np.asarray(x, float)
        self.bytes_out += x.nbytes * len(self.client.scheduler_info().get("workers", {}) or [1])
        x_future = self.client.scatter(x, broadcast=True, hash=False)
        prefix = f"xpcsfit-{name}-{self._token}-{pass_id}"
        level = [
            self.client.submit(func, tile, x_future, self.layout, self.mode, self.L,
                               key=f"{prefix}-tile-{i}")
            for i, tile in enumerate(self.tiles)
        ]
        depth = 0
        while len(level) > 1:
            level = [
                self.client.submit(reducer, *level[i : i + _FAN_IN],
                                   key=f"{prefix}-reduce-{depth}-{i}")
                for i in range(0, len(level), _FAN_IN)
            ]
            depth += 1
        result = level[0].result()
        del x_future
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
        futures = [self.client.submit(tile_lag_sums, t, key=f"xpcsfit-lag-sums-{self._token}-{i}")
                   for i, t in enumerate(self.tiles)]
        parts = self.client.gather(futures)
        return merge_lag_sums(parts, self.layout.n_bins, self.layout.n_phi, n_lags, self.bin_starts)

    def map_tiles(self, func, *args):
        """Run ``func(tile, *args)`` on the workers for every tile; gather results."""
        futures = [self.client.submit(func, t, *args, key=f"xpcsfit-{func.__name__}-{self._token}-{i}")
                   for i, t in enumerate(self.tiles)]
        return self.client.gather(futures)

    def close(self):
        self.client.cancel(self.tiles)
        self.tiles = []
