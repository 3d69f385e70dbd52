"""HDF5 two-time result files (DESIGN.md §3): what both layouts share.

Two layouts are understood, each in its own module with its keys, its map discovery,
its time step and its writer: :mod:`xpcsfit.io.apsu` (NeXus result of boost_corr, maps
under ``/xpcs/twotime/correlation_map``) and :mod:`xpcsfit.io.legacy` (older APS
layout, maps under ``/exchange/C2T_all``). This module tells them apart by the map group
present (:func:`read_info`, :func:`read_dt`), and holds what both readers use: the
plausible ranges, the map-name, map-shape and bin-value checks, and :class:`C2Reader`.
The validated readers of single keys are in :mod:`xpcsfit.io.h5values`; what both
writers use is in :mod:`xpcsfit.io.h5writer`.

Every value read is validated (DESIGN.md §3): grids finite, real and (APS-U) distinct;
where a map exists q in :data:`Q_RANGE` and |phi| <= :data:`PHI_LIMIT`; each map in
exactly one grid cell; map numbers unique; stride and avg positive whole numbers; dt in
:data:`DT_RANGE`. The ranges hold every XPCS measurement by orders of magnitude; values
outside them are damaged or mislabelled (a frame time of 1e300 s made the fit
non-finite; a q of 1e-300 1/Å gave a meaningless "converged" fit). Damaged HDF5 content
is an :class:`InputError` naming the file and the key, like any other bad value.

Everything here is cheap metadata work except :class:`C2Reader`, which reads the slices
of the maps that a dask chunk needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from xpcsfit.errors import InputError
from xpcsfit.io.h5values import hdf5_errors, one_line, scalar

Q_RANGE = (1e-6, 10.0)  # 1/Å: from ~mm length scales to beyond wide-angle XPCS
DT_RANGE = (1e-9, 1e5)  # s per two-time frame: from faster than any XPCS detector to a day
PHI_LIMIT = 360.0  # deg

_HASH_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileInfo:
    """What an HDF5 result file holds, validated.

    Attributes
    ----------
    path : Path
        Absolute path of the file.
    layout : str
        ``"aps-u"`` or ``"legacy"``.
    q_grid : ndarray, shape (n_q_grid,)
        The file's q grid, 1/Å (APS-U: ``dynamic_v_list_dim0``, or dim1 when
        ``map_names`` is [phi, q]; legacy: sorted unique ``dqlist``).
    phi_grid : ndarray, shape (n_phi_grid,)
        The file's phi grid, degrees.
    maps : dict of (int, int) -> str
        HDF5 dataset path of the two-time map of each (q index, phi index) that has one.
    n_frames : int
        T, the side of every map.
    """

    path: Path
    layout: str
    q_grid: np.ndarray
    phi_grid: np.ndarray
    maps: dict[tuple[int, int], str]
    n_frames: int

    def has_map(self) -> np.ndarray:
        """Return a bool array (n_q_grid, n_phi_grid): True where a map exists."""
        out = np.zeros((self.q_grid.size, self.phi_grid.size), dtype=bool)
        for iq, ip in self.maps:
            out[iq, ip] = True
        return out


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB blocks.

    Parameters
    ----------
    path : str or Path
        File to hash.

    Returns
    -------
    str
        64 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only; InputError if missing or not HDF5.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    h5py.File

    Raises
    ------
    InputError
        The path does not exist or is not a readable HDF5 file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({one_line(exc)})") from exc
    if not is_hdf5:
        raise InputError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: cannot open as HDF5 ({one_line(exc)})") from exc


def read_info(path: str | Path) -> FileInfo:
    """Detect the layout of a result file and validate its map bookkeeping.

    Parameters
    ----------
    path : str or Path
        APS-U or legacy two-time result file.

    Returns
    -------
    FileInfo

    Raises
    ------
    InputError
        Missing key, wrong shape or dtype, bin outside the index mapping, two maps in
        one grid cell, non-finite or repeated grid values, q outside Q_RANGE or
        |phi| > 360 where a map exists,
        maps not square, not floating point or not all of one shape, neither layout
        recognised, or HDF5 content that cannot be read.
    """
    path = Path(path)
    with open_h5(path) as f:
        layout = detect_layout(f, path)
        q_grid, phi_grid, maps = _layouts()[layout].read_maps(f, path)
        n_frames = _check_map_shapes(f, path, maps.values())
    return FileInfo(path.resolve(), layout, q_grid, phi_grid, maps, n_frames)


def detect_layout(f: h5py.File, path: Path) -> str:
    """Return ``"aps-u"`` or ``"legacy"`` from the map group present in ``f``.

    Raises
    ------
    InputError
        Neither or both map groups are present.
    """
    layouts = _layouts()
    apsu, legacy = layouts["aps-u"].MAPS, layouts["legacy"].MAPS
    with hdf5_errors(path, "the map groups"):
        present = [name for name, module in layouts.items() if module.MAPS in f]
    if len(present) > 1:
        raise InputError(f"{path}: holds both {apsu} and {legacy}; layout is ambiguous")
    if not present:
        raise InputError(f"{path}: missing key {apsu} (APS-U layout) or {legacy} (legacy layout)")
    return present[0]


def read_dt(path: str | Path, layout: str) -> float:
    """Two-time step dt (s): the product of the layout's timing keys.

    The keys are ``DT_KEYS`` of :mod:`xpcsfit.io.apsu` (all required) or
    :mod:`xpcsfit.io.legacy` (averaging and stride taken as 1 when absent).

    Parameters
    ----------
    path : str or Path
        The result file.
    layout : str
        ``"aps-u"`` or ``"legacy"``.

    Returns
    -------
    float
        dt in seconds, within DT_RANGE.

    Raises
    ------
    InputError
        A required timing key is missing, not one real number, a frame time not finite
        and positive, a frame count (stride, avg) not a positive whole number, or their
        product outside DT_RANGE; the message names the key.
    """
    path = Path(path)
    (time_key, _), *counts = _layouts()[layout].DT_KEYS
    with open_h5(path) as f:
        dt = scalar(f, time_key, path)
        if not (np.isfinite(dt) and dt > 0):
            raise InputError(f"{path}: {time_key} = {dt!r} is not a finite positive number")
        for key, required in counts:
            with hdf5_errors(path, key):
                present = key in f
            if not present and not required:
                continue
            value = scalar(f, key, path)
            if not (np.isfinite(value) and value >= 1 and value == round(value)):
                raise InputError(f"{path}: {key} = {value!r} is not a positive whole number of frames")
            dt *= value
    if not DT_RANGE[0] <= dt <= DT_RANGE[1]:
        raise InputError(
            f"{path}: time step {time_key} x stride x avg = {dt:.6g} s is outside "
            f"{DT_RANGE[0]:g} .. {DT_RANGE[1]:g} s"
        )
    return float(dt)


def _layouts() -> dict:
    """The layout modules by name. Imported here, not at the top: they build on this module."""
    from xpcsfit.io import apsu, legacy

    return {apsu.LAYOUT: apsu, legacy.LAYOUT: legacy}


class C2Reader:
    """Picklable, lazy (q, phi, t1, t2) view of two-time maps in an HDF5 file.

    Meant for ``dask.array.from_array(reader, asarray=True, lock=False)``: each
    ``__getitem__`` opens the file, reads only the slices of the maps the block needs
    and closes it again, so the object can be pickled to dask.distributed workers.
    Values below the diagonal (t2 < t1) are set to NaN whatever the file holds there;
    blocks wholly below the diagonal are not read at all.

    Keys are ints and slices with a positive step (a step along t1/t2, e.g. a
    sub-sampled picture of a map, is one strided HDF5 selection: only the selected
    elements are copied out, and each HDF5 chunk it touches is decompressed once).

    Reading is fast when the file's HDF5 chunks are small compared with a block; maps
    stored as one whole-map chunk are decompressed whole for every block (ingest such
    files into a Zarr store for repeated access).

    Parameters
    ----------
    path : str or Path
        The HDF5 file.
    keys : sequence of sequence of str, shape (n_q, n_phi)
        Dataset path of the map of each selected (q, phi).
    frames : (int, int)
        Inclusive frame range (A, B); index 0 of t1/t2 is frame A.
    token : str
        Identifies the file's content (its sha256) in the dask key, so that a file
        rewritten in place never reuses results cached for the old one.

    Raises
    ------
    IndexError
        From ``__getitem__``: a key other than ints and positive-step slices (arrays,
        Ellipsis, None, step <= 0), an int out of range, or too many indices.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, path: str | Path, keys, frames: tuple[int, int], token: str = ""):
        self.path = str(path)
        self.token = str(token)
        self.keys = tuple(tuple(str(k) for k in row) for row in keys)
        self.frames = (int(frames[0]), int(frames[1]))
        n = self.frames[1] - self.frames[0] + 1
        n_phi = len(self.keys[0]) if self.keys else 0
        self.shape = (len(self.keys), n_phi, n, n)

    def __dask_tokenize__(self):
        return ("xpcsfit.C2Reader", self.path, self.token, self.keys, self.frames)

    def __repr__(self) -> str:
        return f"C2Reader({self.path!r}, shape={self.shape}, frames={self.frames})"

    def __getitem__(self, key) -> np.ndarray:
        ranges, squeeze = _normalize_key(key, self.shape)
        q_idx, p_idx, rows, cols = (range(*r) for r in ranges)
        out = np.full((len(q_idx), len(p_idx), len(rows), len(cols)), np.nan, dtype=np.float32)
        # a block whose last column lies left of its first row is all below the diagonal
        if out.size and cols[-1] >= rows[0]:
            a = self.frames[0]
            # tight stops: the selection ends at the last selected element
            row_sel = slice(a + rows[0], a + rows[-1] + 1, rows.step)
            col_sel = slice(a + cols[0], a + cols[-1] + 1, cols.step)
            with h5py.File(self.path, "r") as f:
                for i, iq in enumerate(q_idx):
                    for j, ip in enumerate(p_idx):
                        out[i, j] = f[self.keys[iq][ip]][row_sel, col_sel]
            lower = np.asarray(cols)[None, :] < np.asarray(rows)[:, None]
            out[..., lower] = np.nan
        return out[squeeze] if squeeze else out


def _normalize_key(key, shape):
    """Turn a basic-indexing key into per-axis (start, stop, step) and a squeeze index.

    ``range(start, stop, step)`` of each axis lists the selected indices (step >= 1,
    possibly empty); the squeeze index drops the axes given as ints, or is None.
    """
    if not isinstance(key, tuple):
        key = (key,)
    if len(key) > len(shape):
        raise IndexError(f"too many indices for shape {shape}: {key!r}")
    key = key + (slice(None),) * (len(shape) - len(key))
    ranges, squeeze, any_int = [], [], False
    for k, n in zip(key, shape):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step < 1:
                raise IndexError(f"C2Reader supports positive-step slices only, got {k!r}")
            ranges.append((start, max(start, stop), step))
            squeeze.append(slice(None))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {k} out of range for axis of length {n}")
            ranges.append((i, i + 1, 1))
            squeeze.append(0)
            any_int = True
        else:
            raise IndexError(f"C2Reader supports ints and slices only, got {k!r}")
    return ranges, (tuple(squeeze) if any_int else None)


def sorted_map_names(f: h5py.File, path: Path, group: str, pattern, what: str) -> list[str]:
    """Names in ``group`` matching ``pattern`` (one number group), in numeric order.

    Raises
    ------
    InputError
        ``group`` is not a group or cannot be read, holds no such map (``what`` names
        the pattern), or two maps have the same number.
    """
    with hdf5_errors(path, group):
        grp = f[group]
        if not isinstance(grp, h5py.Group):
            raise InputError(f"{path}: {group} is not a group")
        listed = list(grp)
    # numeric sort equals the writers' zero-padded name sort, and stays right past 99999
    names = sorted((n for n in listed if pattern.match(n)), key=lambda n: int(pattern.match(n)[1]))
    if not names:
        raise InputError(f"{path}: {group} holds no {what} maps")
    for a, b in zip(names, names[1:]):
        # c2_7 and c2_00007 would make the map order, and so the bin of each map, ambiguous
        if int(pattern.match(a)[1]) == int(pattern.match(b)[1]):
            raise InputError(f"{path}: maps {group}/{a} and {b} have the same number")
    return names


def check_bin_values(path, q_key, phi_key, q_grid, phi_grid, maps) -> None:
    """q in Q_RANGE and |phi| <= PHI_LIMIT for every bin that has a map.

    Raises
    ------
    InputError
        Naming the key (``q_key``, ``phi_key``) the value comes from and the map.
    """
    for (iq, ip), name in sorted(maps.items()):
        name = name.rsplit("/", 1)[1]
        if not Q_RANGE[0] <= q_grid[iq] <= Q_RANGE[1]:
            raise InputError(
                f"{path}: {q_key} gives q = {q_grid[iq]:.6g} 1/Å for map {name}, outside "
                f"{Q_RANGE[0]:g} .. {Q_RANGE[1]:g} 1/Å"
            )
        if not abs(phi_grid[ip]) <= PHI_LIMIT:
            raise InputError(
                f"{path}: {phi_key} gives phi = {phi_grid[ip]:.6g} deg for map {name}, outside "
                f"-{PHI_LIMIT:g} .. {PHI_LIMIT:g} deg"
            )


def _check_map_shapes(f, path, keys) -> int:
    shape = None
    for key in keys:
        with hdf5_errors(path, key):
            ds = f[key]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.shape[0] != ds.shape[1]:
            got = ds.shape if isinstance(ds, h5py.Dataset) else "a group"
            raise InputError(f"{path}: {key} is not a square 2-D map (shape {got})")
        if shape is None:
            shape = ds.shape
        elif ds.shape != shape:
            raise InputError(f"{path}: {key} has shape {ds.shape}, other maps {shape}")
        if ds.dtype.kind != "f":
            raise InputError(f"{path}: {key} has dtype {ds.dtype}, expected floating point")
    if shape[0] < 3:
        raise InputError(f"{path}: maps are {shape[0]}x{shape[0]}; at least 3 frames are needed")
    return int(shape[0])

