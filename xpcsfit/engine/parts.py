"""Parts: the groups of consecutive tiles that the Dask evaluator gives one worker task
each, and the fixed tree their sums are added over.

Sums are added over groups of :data:`FAN_IN` tiles, then groups of FAN_IN of those, …
(:func:`tree_sum`). A part is an aligned subtree of that tree (:func:`part_size` is a
power of FAN_IN), so summing within parts and then over parts adds the same numbers in
the same order as summing all tiles at once: results are bit for bit the same whatever
the number of parts or workers. The ``*_part`` functions are the worker tasks.
"""

from __future__ import annotations

from functools import reduce
from operator import add

from xpcsfit.engine.kernel import Tile
from xpcsfit.engine.tiles import TileSpec

FAN_IN = 2
PARTS_PER_WORKER = 2


def tree_sum(values: list):
    """Sum ``values`` over the fixed reduction tree: groups of FAN_IN, left to right."""
    level = list(values)
    while len(level) > 1:
        level = [reduce(add, level[i : i + FAN_IN]) for i in range(0, len(level), FAN_IN)]
    return level[0]


def load_part(specs: list[TileSpec]) -> list[Tile]:
    """Worker task: load the tiles of one part (memory ``hold``)."""
    return [s.load() for s in specs]


def keep_part(specs: list[TileSpec]) -> list[TileSpec]:
    """Worker task: keep the specs of one part (memory ``stream``).

    A task rather than a scatter, so that Dask can recompute it if its worker dies.
    """
    return specs


def part_map(func, part: list, *args) -> list:
    """Worker task: ``[func(tile, *args) for tile in part]``.

    A streamed part (specs) loads one tile at a time, so a worker holds one tile plus
    the small per-tile results whatever the part's size.
    """
    return [func(t.load() if isinstance(t, TileSpec) else t, *args) for t in part]


def part_sum(func, part: list, *args):
    """Worker task: ``func(tile, *args)`` over one part's tiles, tree-summed."""
    return tree_sum(part_map(func, part, *args))


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
