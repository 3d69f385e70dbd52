"""Worker memory: does one tile and its kernel workspace fit a Dask worker's memory_limit?

:class:`~xpcsfit.engine.evaluator.DaskEvaluator` checks this before loading anything
(:func:`shortfall`), so a worker too small for a tile is one ConfigError up front, not
workers killed and restarted by their nanny; and turns Dask's KilledWorker (workers
that kept dying on a task, usually out of memory) into the same kind of ConfigError
(:func:`workers_dying`).
"""

from __future__ import annotations

import contextlib

from xpcsfit.engine.kernel import compiled_variants
from xpcsfit.errors import ConfigError

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


def worker_memory() -> tuple[int, int]:
    """Worker check: (resident bytes of this process, compiled tile-kernel variants)."""
    import psutil

    return psutil.Process().memory_info().rss, compiled_variants()


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


def shortfall(storage: str, groups: list, workers: list, limits: dict, memory: dict,
              tile_shape: tuple[int, int]) -> str | None:
    """Why some worker cannot run this fit within its memory_limit, or None.

    A worker needs, above what its process already uses: WORKSPACE_FACTOR × one
    tile's bytes, COMPILE_BYTES if it has not compiled a tile kernel yet, and ("hold")
    the tiles of the parts placed on it; all within :func:`memory_threshold` of its
    memory_limit. Workers without a limit are not checked.

    Parameters
    ----------
    storage : {"hold", "stream"}
    groups : list of list of TileSpec
        The parts, placed round robin on ``workers``.
    workers : list of str
        Worker addresses, in placement order.
    limits : dict
        {address: memory_limit in bytes, 0 for none}.
    memory : dict
        {address: :func:`worker_memory` of that worker}.
    tile_shape : (frames, phi)
        One tile's shape, for the message.
    """
    size, n_phi = tile_shape
    one_tile = max((s.nbytes for g in groups for s in g), default=0)
    threshold = memory_threshold()
    for k, w in enumerate(workers):
        limit = limits[w]
        if not limit or w not in memory:
            continue
        rss, compiled = memory[w]
        held = sum(s.nbytes for g in groups[k :: len(workers)] for s in g) if storage == "hold" else 0
        compile_bytes = 0 if compiled else COMPILE_BYTES
        need = WORKSPACE_FACTOR * one_tile + compile_bytes + held
        if rss + need <= threshold * limit:
            continue
        needs = [f"{WORKSPACE_FACTOR * one_tile / MiB:.0f} MiB for one tile and its kernel workspace"]
        if compile_bytes:
            needs.append(f"{compile_bytes / MiB:.0f} MiB to compile the kernels")
        if held:
            needs.append(f"{held / MiB:.0f} MiB of held tiles")
        fix = "choose a smaller tile (config tile: / --tile)"
        fix += ", stream the tiles (config memory: stream)" if held else ""
        return (f"tiles of {size} frames × {n_phi} phi need about {need / MiB:.0f} MiB on worker {w} "
                f"({' + '.join(needs)}), but its memory_limit is {limit / MiB:.0f} MiB, it uses "
                f"{rss / MiB:.0f} MiB already and stops running tasks at {threshold:.0%} of the "
                f"limit: {fix} or give the workers a larger memory_limit")
    return None


@contextlib.contextmanager
def workers_dying(client, what: str, futures: list, limits: dict, tile_shape: tuple[int, int],
                  tile_mib: float):
    """Turn Dask's KilledWorker (a task's workers died, usually out of memory) into a
    ConfigError naming the settings that size a worker's memory.

    ``futures`` are cancelled then, so their tasks stop killing workers. ``limits`` is
    {address: memory_limit}, ``tile_shape`` (frames, phi) and ``tile_mib`` one tile's
    MiB, for the message.

    Raises
    ------
    ConfigError
        In place of KilledWorker.
    """
    from distributed import KilledWorker

    try:
        yield
    except KilledWorker as exc:
        client.cancel(futures)
        size, n_phi = tile_shape
        limit_text = ", ".join(f"{v / MiB:.0f} MiB" if v else "none" for v in sorted(set(limits.values())))
        raise ConfigError(
            f"worker processes died {exc.allowed_failures + 1} times while {what} (task {exc.task!r}, "
            f"tiles of {size} frames × {n_phi} phi, {tile_mib:.1f} MiB each); if they ran out of memory, "
            f"choose a smaller tile (config tile: / --tile) or give the workers a larger memory_limit "
            f"(now {limit_text or 'unknown'})"
        ) from None
