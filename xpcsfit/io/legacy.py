"""The legacy APS layout of two-time result files (DESIGN.md §3).

Maps ``/exchange/C2T_all/g2_NNNNN``; the i-th map in sorted name order has q
``/xpcs/dqlist[0, i]`` and phi ``/xpcs/dphilist[0, i]``; the q (phi) grid is the sorted
unique list of those values. Time step dt =
``/measurement/instrument/detector/exposure_period`` × ``/xpcs/avg_frames`` ×
``/xpcs/stride_frames``; the last two are taken as 1 when absent (documented default:
older files written without frame averaging or striding omit them).

:func:`read_maps` is called by :func:`xpcsfit.io.hdf5.read_info`; :func:`write_legacy`
writes such files (tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from xpcsfit.errors import InputError
from xpcsfit.io.h5values import float_vector
from xpcsfit.io.h5writer import MapSource, write_result_file
from xpcsfit.io.hdf5 import check_bin_values, sorted_map_names

LAYOUT = "legacy"
MAPS = "/exchange/C2T_all"
Q = "/xpcs/dqlist"
PHI = "/xpcs/dphilist"
EXPOSURE = "/measurement/instrument/detector/exposure_period"
AVG = "/xpcs/avg_frames"
STRIDE = "/xpcs/stride_frames"
# (key, required): dt is their product (xpcsfit.io.hdf5.read_dt)
DT_KEYS = ((EXPOSURE, True), (AVG, False), (STRIDE, False))

_NAME = re.compile(r"^g2_(\d+)$")


def read_maps(f: h5py.File, path: Path) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], str]]:
    """The q grid (1/Å), the phi grid (deg) and the map of each (q index, phi index).

    q and phi are compared after rounding to 10 significant digits, so equal bins
    written with float noise fall on one grid point.

    Raises
    ------
    InputError
        A key missing or malformed, ``dqlist``/``dphilist`` not one value per map,
        two maps with the same q and phi, or q or phi of a map outside the plausible
        ranges (:func:`xpcsfit.io.hdf5.check_bin_values`).
    """
    names = sorted_map_names(f, path, MAPS, _NAME, "g2_NNNNN")
    qs = _round_rel(float_vector(f, Q, path, allow_row=True))
    phis = _round_rel(float_vector(f, PHI, path, allow_row=True))
    for key, values in ((Q, qs), (PHI, phis)):
        if values.size != len(names):
            raise InputError(f"{path}: {key} has {values.size} entries but {MAPS} holds {len(names)} maps")
    q_grid, phi_grid = np.unique(qs), np.unique(phis)
    maps: dict[tuple[int, int], str] = {}
    for name, q, phi in zip(names, qs, phis):
        cell = (int(np.searchsorted(q_grid, q)), int(np.searchsorted(phi_grid, phi)))
        if cell in maps:
            raise InputError(
                f"{path}: maps {maps[cell].rsplit('/', 1)[1]} and {name} both have "
                f"q={q:.6g}, phi={phi:.6g} ({Q} / {PHI})"
            )
        maps[cell] = f"{MAPS}/{name}"
    check_bin_values(path, Q, PHI, q_grid, phi_grid, maps)
    return q_grid, phi_grid, maps


def _round_rel(values: np.ndarray) -> np.ndarray:
    """Round to 10 significant digits so that equal bins compare equal (1e-9 relative)."""
    return np.array([float(f"{v:.9e}") for v in values], dtype=np.float64)


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
    """Write a legacy-layout APS two-time result file, atomically.

    Maps are numbered g2_00001, … in ascending (q index, phi index) order;
    ``/xpcs/dqlist`` and ``/xpcs/dphilist`` (shape (1, n_maps)) give each map's q and phi.

    Parameters
    ----------
    path : str or Path
        Output file; replaced if it exists.
    q_grid, phi_grid : array_like
        q (1/Å) and phi (degrees) values that the map bins index.
    maps : mapping of (q index, phi index) -> array (T, T) or callable
        As for :func:`xpcsfit.io.apsu.write_aps_u`.
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
        As for :func:`xpcsfit.io.apsu.write_aps_u`.
    """

    def write_keys(f: h5py.File, q_grid, phi_grid, cells) -> None:
        f[Q] = q_grid[[iq for iq, _ in cells]][None, :]
        f[PHI] = phi_grid[[ip for _, ip in cells]][None, :]
        f[EXPOSURE] = np.full((1, 1), exposure_period, np.float64)
        if avg_frames is not None:
            f[AVG] = np.full((1, 1), avg_frames, np.int64)
        if stride_frames is not None:
            f[STRIDE] = np.full((1, 1), stride_frames, np.int64)

    return write_result_file(path, q_grid, phi_grid, maps, n_frames, group=MAPS, prefix="g2",
                             compression=compression, write_keys=write_keys)
