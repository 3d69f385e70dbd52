"""The APS-U layout: the NeXus two-time result written by boost_corr (DESIGN.md §3).

Maps ``/xpcs/twotime/correlation_map/c2_NNNNN``; the i-th map in sorted name order
belongs to the 1-based dynamic bin ``/xpcs/twotime/processed_bins[i]``; the bin is placed
on the grid ``/xpcs/qmap/dynamic_v_list_dim0 × dynamic_v_list_dim1`` through
``dynamic_index_mapping``, ``dynamic_num_pts`` and ``map_names``. Time step dt =
``/entry/instrument/detector_1/frame_time`` × ``/xpcs/twotime/config/stride_frame`` ×
``/xpcs/twotime/config/avg_frame`` (all three required).

:func:`read_maps` is called by :func:`xpcsfit.io.hdf5.read_info`; :func:`write_aps_u`
writes such files (``xpcsfit simulate``, tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from xpcsfit.errors import InputError
from xpcsfit.io.h5values import decode, float_vector, int_vector, read
from xpcsfit.io.h5writer import MapSource, write_result_file
from xpcsfit.io.hdf5 import check_bin_values, sorted_map_names

LAYOUT = "aps-u"
MAPS = "/xpcs/twotime/correlation_map"
BINS = "/xpcs/twotime/processed_bins"
Q = "/xpcs/qmap/dynamic_v_list_dim0"
PHI = "/xpcs/qmap/dynamic_v_list_dim1"
INDEX_MAPPING = "/xpcs/qmap/dynamic_index_mapping"
NUM_PTS = "/xpcs/qmap/dynamic_num_pts"
MAP_NAMES = "/xpcs/qmap/map_names"
MAP_UNITS = "/xpcs/qmap/map_units"
FRAME_TIME = "/entry/instrument/detector_1/frame_time"
STRIDE = "/xpcs/twotime/config/stride_frame"
AVG = "/xpcs/twotime/config/avg_frame"
# (key, required): dt is their product (xpcsfit.io.hdf5.read_dt)
DT_KEYS = ((FRAME_TIME, True), (STRIDE, True), (AVG, True))

_NAME = re.compile(r"^c2_(\d+)$")


def read_maps(f: h5py.File, path: Path) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], str]]:
    """The q grid (1/Å), the phi grid (deg) and the map of each (q index, phi index).

    Raises
    ------
    InputError
        A key missing or malformed, ``processed_bins`` not one per map, a bin outside
        ``dynamic_index_mapping`` or the grid, ``map_names`` neither [q, phi] nor
        [phi, q], repeated grid values, two maps of one bin, or q or phi of a map
        outside the plausible ranges (:func:`xpcsfit.io.hdf5.check_bin_values`).
    """
    names = sorted_map_names(f, path, MAPS, _NAME, "c2_NNNNN")
    bins = int_vector(f, BINS, path)
    if bins.size != len(names):
        raise InputError(f"{path}: {BINS} has {bins.size} entries but {MAPS} holds {len(names)} maps")
    dim0 = float_vector(f, Q, path, distinct=True)
    dim1 = float_vector(f, PHI, path, distinct=True)
    mapping = int_vector(f, INDEX_MAPPING, path)
    num_pts = int_vector(f, NUM_PTS, path)
    if num_pts.size != 2 or tuple(num_pts) != (dim0.size, dim1.size):
        raise InputError(
            f"{path}: {NUM_PTS} = {num_pts.tolist()} does not match the grid sizes "
            f"({dim0.size}, {dim1.size}) of {Q} and {PHI}"
        )
    map_names = [decode(v).strip().lower() for v in np.ravel(read(f, MAP_NAMES, path))]
    if map_names == ["q", "phi"]:
        q_dim = 0
    elif map_names == ["phi", "q"]:
        q_dim = 1
    else:
        raise InputError(f"{path}: {MAP_NAMES} = {map_names} is neither [q, phi] nor [phi, q]")
    n_cells = dim0.size * dim1.size
    maps: dict[tuple[int, int], str] = {}
    for name, b in zip(names, bins):
        if not 1 <= b <= mapping.size:
            raise InputError(
                f"{path}: {BINS} value {b} (map {name}) outside {INDEX_MAPPING} (1..{mapping.size})"
            )
        absolute = int(mapping[b - 1])
        if not 0 <= absolute < n_cells:
            raise InputError(
                f"{path}: {INDEX_MAPPING}[{b - 1}] = {absolute} outside the "
                f"{dim0.size}x{dim1.size} grid"
            )
        # pyXpcsViewer rule: absolute = i0 * n_dim1 + i1
        i0, i1 = divmod(absolute, dim1.size)
        cell = (i0, i1) if q_dim == 0 else (i1, i0)
        if cell in maps:
            raise InputError(
                f"{path}: maps {maps[cell].rsplit('/', 1)[1]} and {name} both belong to bin "
                f"(q index {cell[0]}, phi index {cell[1]}) ({BINS} / {INDEX_MAPPING})"
            )
        maps[cell] = f"{MAPS}/{name}"
    q_grid, phi_grid = (dim0, dim1) if q_dim == 0 else (dim1, dim0)
    q_key, phi_key = (Q, PHI) if q_dim == 0 else (PHI, Q)
    check_bin_values(path, q_key, phi_key, q_grid, phi_grid, maps)
    return q_grid, phi_grid, maps


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
    """Write an APS-U (NeXus, boost_corr) two-time result file, atomically.

    Maps are numbered c2_00001, c2_00002, … in ascending (q index, phi index) order, the
    way boost_corr numbers them; ``processed_bins`` holds the 1-based bin of each,
    ``dynamic_index_mapping`` is the identity over the full grid and ``map_names`` is
    [q, phi]. Only the keys that :func:`read_maps` and the time step read are written;
    maps as :func:`xpcsfit.io.h5writer.write_result_file` writes them (upper triangle).

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

    def write_keys(f: h5py.File, q_grid, phi_grid, cells) -> None:
        f[BINS] = np.array([iq * phi_grid.size + ip + 1 for iq, ip in cells], np.int64)
        f[Q] = q_grid
        f[PHI] = phi_grid
        f[INDEX_MAPPING] = np.arange(q_grid.size * phi_grid.size, dtype=np.int64)
        f[NUM_PTS] = np.array([q_grid.size, phi_grid.size], np.int64)
        f[MAP_NAMES] = np.array([b"q", b"phi"], dtype=object)
        f[MAP_UNITS] = np.array(["Å⁻¹".encode(), b"deg"], dtype=object)
        f[STRIDE] = np.int64(stride_frame)
        f[AVG] = np.int64(avg_frame)
        f[FRAME_TIME] = np.float64(frame_time)
        f.attrs.update(dict(attrs or {}))

    return write_result_file(path, q_grid, phi_grid, maps, n_frames, group=MAPS, prefix="c2",
                             compression=compression, write_keys=write_keys)
