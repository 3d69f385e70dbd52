"""What the writers of both layouts share: map validation, the band-wise map writer, the atomic file.

Maps are given either as (T, T) arrays or as callables ``band(row_start, row_stop) ->
(rows, T)``, so that 8000 × 8000 maps can be produced band by band without holding
them. Only the upper triangle (diagonal included) is stored, the lower triangle is 0,
as boost_corr does. Files are written under a temporary name and renamed when complete
(:func:`xpcsfit.io.atomic.atomic_file`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import h5py
import numpy as np

from xpcsfit.errors import ConfigError
from xpcsfit.io.atomic import atomic_file

MapSource = np.ndarray | Callable[[int, int], np.ndarray]

_BAND = 256  # rows per write; also the HDF5 chunk side



def check_maps(q_grid, phi_grid, maps: Mapping[tuple[int, int], MapSource],
               n_frames: int | None) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], int]:
    """Validate what a writer is given.

    Returns
    -------
    (q_grid, phi_grid, cells, n_frames)
        The grids as float64 arrays, the cells of ``maps`` in ascending (q index, phi
        index) order, and T.

    Raises
    ------
    ConfigError
        Empty ``maps``, bin outside the grid, an array map not (T, T), or T unknown
        (every map a callable and ``n_frames`` None).
    """
    q_grid = np.asarray(q_grid, dtype=np.float64)
    phi_grid = np.asarray(phi_grid, dtype=np.float64)
    cells = sorted(maps)
    for iq, ip in cells:
        if not (0 <= iq < q_grid.size and 0 <= ip < phi_grid.size):
            raise ConfigError(f"map bin ({iq}, {ip}) outside the {q_grid.size}x{phi_grid.size} grid")
    if not maps:
        raise ConfigError("no maps to write")
    for cell, m in maps.items():
        if callable(m):
            continue
        shape = np.shape(m)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ConfigError(f"map {cell} has shape {shape}, expected (T, T)")
        if n_frames is None:
            n_frames = shape[0]
        elif shape[0] != n_frames:
            raise ConfigError(f"map {cell} has shape {shape}, expected ({n_frames}, {n_frames})")
    if n_frames is None:
        raise ConfigError("n_frames is required when every map is a callable")
    return q_grid, phi_grid, cells, int(n_frames)


def write_file(path: str | Path, fill: Callable[[h5py.File], None]) -> Path:
    """Write a new HDF5 file with ``fill(f)`` and put it at ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as f:
            fill(f)
    return path


def write_maps(f: h5py.File, group: str, prefix: str, cells, maps: Mapping[tuple[int, int], MapSource],
               n: int, compression) -> None:
    """Write the maps of ``cells`` as ``group/PREFIX_00001``, … in that order, upper triangle only.

    Maps are written in bands of 256 rows (HDF5 chunks 256 × 256), as float32, the
    lower triangle set to 0 as boost_corr does; a callable map gives each band itself.

    Raises
    ------
    ConfigError
        A band of the wrong shape.
    """
    side = min(n, _BAND)
    for i, cell in enumerate(cells, start=1):
        key, source = f"{group}/{prefix}_{i:05d}", maps[cell]
        ds = f.create_dataset(key, shape=(n, n), dtype=np.float32, chunks=(side, side),
                              compression=compression)
        for a in range(0, n, _BAND):
            b = min(a + _BAND, n)
            band = np.asarray(source(a, b) if callable(source) else source[a:b], dtype=np.float32)
            if band.shape != (b - a, n):
                raise ConfigError(f"{key}: band rows {a}:{b} has shape {band.shape}, expected {(b - a, n)}")
            band = band.copy()
            band[np.arange(n)[None, :] < np.arange(a, b)[:, None]] = 0.0  # upper triangle only
            ds[a:b] = band
