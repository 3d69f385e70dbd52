"""Write two-time result files in the APS-U (boost_corr) or legacy layout.

Used by ``xpcsfit simulate`` and by tests that need files with known (or deliberately
bad) content. Only the keys that :mod:`xpcsfit.io.hdf5` reads are written. Maps are given
either as (T, T) arrays or as callables ``band(row_start, row_stop) -> (rows, T)`` so
that 8000 × 8000 maps can be produced band by band without holding them. Only the upper
triangle (diagonal included) is stored, the lower triangle is 0, as boost_corr does.
Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import h5py
import numpy as np

from xpcsfit.io import hdf5 as _hdf
from xpcsfit.io.atomic import atomic_file
from xpcsfit.errors import ConfigError

MapSource = np.ndarray | Callable[[int, int], np.ndarray]

_BAND = 256  # rows per write; also the HDF5 chunk side


def write_aps_u(
    path: str | Path,
    *,
    q_grid,
    phi_grid,
    maps: Mapping[tuple[int, int], MapSource],
    frame_time: float,
    stride_frame: int = 1,
    avg_frame: int = 1,
    compression: str | None = "lzf",
    n_frames: int | None = None,
    attrs: Mapping[str, str] | None = None,
) -> Path:
    """Write an APS-U (NeXus, boost_corr) two-time result file.

    Maps are numbered c2_00001, c2_00002, … in ascending (q index, phi index) order, the
    way boost_corr numbers them; ``processed_bins`` holds the 1-based bin of each,
    ``dynamic_index_mapping`` is the identity over the full grid and ``map_names`` is
    [q, phi].

    Parameters
    ----------
    path : str or Path
        Output file; replaced if it exists.
    q_grid : array_like, shape (n_q,)
        q bin centres, 1/Å (``dynamic_v_list_dim0``).
    phi_grid : array_like, shape (n_phi,)
        phi bin centres, degrees (``dynamic_v_list_dim1``).
    maps : mapping of (q index, phi index) -> array (T, T) or callable
        The two-time map of each bin that has one; a callable ``band(a, b)`` returns
        rows a..b-1 of the map, shape (b - a, T). Values are stored as float32.
    frame_time : float
        ``/entry/instrument/detector_1/frame_time``, s. Not validated, so that tests
        can write bad values.
    stride_frame, avg_frame : int
        ``/xpcs/twotime/config/stride_frame`` and ``avg_frame``.
    compression : str or None
        h5py compression filter of the maps.
    n_frames : int, optional
        T; required when every map is a callable, checked against arrays otherwise.
    attrs : mapping of str -> str, optional
        Attributes of the file's root group (``xpcsfit simulate`` marks its files).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        Empty ``maps``, bin outside the grid, map of the wrong shape, or T unknown.
    """
    q_grid = np.asarray(q_grid, dtype=np.float64)
    phi_grid = np.asarray(phi_grid, dtype=np.float64)
    cells = sorted(maps)
    for iq, ip in cells:
        if not (0 <= iq < q_grid.size and 0 <= ip < phi_grid.size):
            raise ConfigError(f"map bin ({iq}, {ip}) outside the {q_grid.size}x{phi_grid.size} grid")
    n = _n_frames(maps, n_frames)
    n_cells = q_grid.size * phi_grid.size

    def fill(f: h5py.File) -> None:
        for i, cell in enumerate(cells, start=1):
            _write_map(f, f"{_hdf.APSU_MAPS}/c2_{i:05d}", maps[cell], n, compression)
        f[_hdf.APSU_BINS] = np.array([iq * phi_grid.size + ip + 1 for iq, ip in cells], np.int64)
        f[_hdf.APSU_Q] = q_grid
        f[_hdf.APSU_PHI] = phi_grid
        f[_hdf.APSU_INDEX_MAPPING] = np.arange(n_cells, dtype=np.int64)
        f[_hdf.APSU_NUM_PTS] = np.array([q_grid.size, phi_grid.size], np.int64)
        f[_hdf.APSU_MAP_NAMES] = np.array([b"q", b"phi"], dtype=object)
        f["/xpcs/qmap/map_units"] = np.array(["Å⁻¹".encode(), b"deg"], dtype=object)
        f[_hdf.APSU_STRIDE] = np.int64(stride_frame)
        f[_hdf.APSU_AVG] = np.int64(avg_frame)
        f[_hdf.APSU_FRAME_TIME] = np.float64(frame_time)
        f.attrs.update(dict(attrs or {}))

    return _atomic_write(path, fill)


def write_legacy(
    path: str | Path,
    *,
    q_grid,
    phi_grid,
    maps: Mapping[tuple[int, int], MapSource],
    exposure_period: float,
    avg_frames: int | None = None,
    stride_frames: int | None = None,
    compression: str | None = "lzf",
    n_frames: int | None = None,
) -> Path:
    """Write a legacy-layout APS two-time result file.

    Maps are numbered g2_00001, … in ascending (q index, phi index) order;
    ``/xpcs/dqlist`` and ``/xpcs/dphilist`` (shape (1, n_maps)) give each map's q and phi.

    Parameters
    ----------
    path : str or Path
        Output file; replaced if it exists.
    q_grid, phi_grid : array_like
        q (1/Å) and phi (degrees) values that the map bins index.
    maps : mapping of (q index, phi index) -> array (T, T) or callable
        As for :func:`write_aps_u`.
    exposure_period : float
        ``/measurement/instrument/detector/exposure_period``, s (stored as (1, 1)).
    avg_frames, stride_frames : int, optional
        ``/xpcs/avg_frames``, ``/xpcs/stride_frames``; not written when None.
    compression : str or None
        h5py compression filter of the maps.
    n_frames : int, optional
        T; required when every map is a callable.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        As for :func:`write_aps_u`.
    """
    q_grid = np.asarray(q_grid, dtype=np.float64)
    phi_grid = np.asarray(phi_grid, dtype=np.float64)
    cells = sorted(maps)
    for iq, ip in cells:
        if not (0 <= iq < q_grid.size and 0 <= ip < phi_grid.size):
            raise ConfigError(f"map bin ({iq}, {ip}) outside the {q_grid.size}x{phi_grid.size} grid")
    n = _n_frames(maps, n_frames)

    def fill(f: h5py.File) -> None:
        for i, cell in enumerate(cells, start=1):
            _write_map(f, f"{_hdf.LEGACY_MAPS}/g2_{i:05d}", maps[cell], n, compression)
        f[_hdf.LEGACY_Q] = q_grid[[iq for iq, _ in cells]][None, :]
        f[_hdf.LEGACY_PHI] = phi_grid[[ip for _, ip in cells]][None, :]
        f[_hdf.LEGACY_EXPOSURE] = np.full((1, 1), exposure_period, np.float64)
        if avg_frames is not None:
            f[_hdf.LEGACY_AVG] = np.full((1, 1), avg_frames, np.int64)
        if stride_frames is not None:
            f[_hdf.LEGACY_STRIDE] = np.full((1, 1), stride_frames, np.int64)

    return _atomic_write(path, fill)


def _n_frames(maps: Mapping[tuple[int, int], MapSource], n_frames: int | None) -> int:
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
    return int(n_frames)


def _write_map(f: h5py.File, key: str, source: MapSource, n: int, compression) -> None:
    side = min(n, _BAND)
    ds = f.create_dataset(key, shape=(n, n), dtype=np.float32, chunks=(side, side), compression=compression)
    for a in range(0, n, _BAND):
        b = min(a + _BAND, n)
        band = np.asarray(source(a, b) if callable(source) else source[a:b], dtype=np.float32)
        if band.shape != (b - a, n):
            raise ConfigError(f"{key}: band rows {a}:{b} has shape {band.shape}, expected {(b - a, n)}")
        band = band.copy()
        band[np.arange(n)[None, :] < np.arange(a, b)[:, None]] = 0.0  # upper triangle only
        ds[a:b] = band


def _atomic_write(path: str | Path, fill: Callable[[h5py.File], None]) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as f:
            fill(f)
    return path
