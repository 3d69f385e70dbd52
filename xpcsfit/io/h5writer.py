"""What the writers of both layouts share: :func:`write_result_file` checks the maps,
writes them band by band and puts the file in place atomically; each layout adds its keys.

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


def write_result_file(path: str | Path, q_grid, phi_grid, maps: Mapping[tuple[int, int], MapSource],
                      n_frames: int | None, *, group: str, prefix: str, compression,
                      write_keys: Callable[[h5py.File, np.ndarray, np.ndarray, list], None]) -> Path:
    """Write a two-time result file at ``path`` atomically; return ``path``.

    Parameters
    ----------
    path : str or Path
    q_grid, phi_grid : array_like, shapes (n_q,), (n_phi,)
        q (1/Å) and phi (degrees) values that the map bins index.
    maps : mapping of (q index, phi index) -> array (T, T) or callable
        See the module docstring.
    n_frames : int or None
        T; required when every map is a callable.
    group, prefix : str
        The maps are written as ``group/PREFIX_00001``, … in ascending (q, phi) order.
    compression : str or None
        h5py compression filter of the maps.
    write_keys : callable
        ``write_keys(f, q_grid, phi_grid, cells)`` writes the layout's other keys;
        ``cells`` are the maps' bins in the order written, q_grid and phi_grid float64.

    Raises
    ------
    ConfigError
        Empty ``maps``, a bin outside the grid, a map or band of the wrong shape, or T
        unknown.
    """
    q_grid, phi_grid, cells, n = _check_maps(q_grid, phi_grid, maps, n_frames)
    path = Path(path)
    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_maps(f, group, prefix, cells, maps, n, compression)
            write_keys(f, q_grid, phi_grid, cells)
    return path


def _check_maps(q_grid, phi_grid, maps: Mapping[tuple[int, int], MapSource],
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


def _write_maps(f: h5py.File, group: str, prefix: str, cells, maps: Mapping[tuple[int, int], MapSource],
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
