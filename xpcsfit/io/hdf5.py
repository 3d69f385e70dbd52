"""HDF5 two-time result files (DESIGN.md §3): what both layouts share.

Two layouts are understood, each in its own module with its keys, its map discovery,
its time step and its writer: :mod:`xpcsfit.io.apsu` (NeXus result of boost_corr, maps
under ``/xpcs/twotime/correlation_map``) and :mod:`xpcsfit.io.legacy` (older APS
layout, maps under ``/exchange/C2T_all``). This module tells them apart by the map group
present (:func:`read_info`, :func:`read_dt`), and holds what both readers use: the
validated readers of single keys, the map-shape checks, and :class:`C2Reader`. What
both writers use is in :mod:`xpcsfit.io.h5writer`.

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
    if not h5py.is_hdf5(path):
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
        Missing key, wrong shape, bin outside the index mapping, non-finite grid,
        maps not square or not all of one shape, or neither layout recognised.
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
        dt in seconds, finite and > 0.

    Raises
    ------
    InputError
        A required timing key is missing, or a value is not finite and positive; the
        message names the key.
    """
    path = Path(path)
    keys = _layouts()[layout].DT_KEYS
    with open_h5(path) as f:
        dt = 1.0
        for key, required in keys:
            if key not in f and not required:
                continue
            value = scalar(f, key, path)
            if not (np.isfinite(value) and value > 0):
                raise InputError(f"{path}: {key} = {value!r} is not a finite positive number")
            dt *= value
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
        ``group`` is not a group or holds no such map (``what`` names the pattern).
    """
    grp = f[group]
    if not isinstance(grp, h5py.Group):
        raise InputError(f"{path}: {group} is not a group")
    # numeric sort equals the writers' zero-padded name sort, and stays right past 99999
    names = sorted((n for n in grp if pattern.match(n)), key=lambda n: int(pattern.match(n)[1]))
    if not names:
        raise InputError(f"{path}: {group} holds no {what} maps")
    return names


def _check_map_shapes(f, path, keys) -> int:
    shape = None
    for key in keys:
        ds = f[key]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.shape[0] != ds.shape[1]:
            got = ds.shape if isinstance(ds, h5py.Dataset) else "a group"
            raise InputError(f"{path}: {key} is not a square 2-D map (shape {got})")
        if shape is None:
            shape = ds.shape
        elif ds.shape != shape:
            raise InputError(f"{path}: {key} has shape {ds.shape}, other maps {shape}")
        if not np.issubdtype(ds.dtype, np.floating):
            raise InputError(f"{path}: {key} has dtype {ds.dtype}, expected floating point")
    if shape[0] < 3:
        raise InputError(f"{path}: maps are {shape[0]}x{shape[0]}; at least 3 frames are needed")
    return int(shape[0])


def require(f, key, path) -> h5py.Dataset:
    """The dataset ``key`` of ``f``; InputError naming ``path`` and ``key`` if missing or a group."""
    if key not in f:
        raise InputError(f"{path}: missing key {key}")
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise InputError(f"{path}: {key} is a group, expected a dataset")
    return obj


def scalar(f, key, path) -> float:
    """The one number stored at ``key`` (any shape of size 1); InputError otherwise."""
    value = np.asarray(require(f, key, path)[()])
    # legacy files often store scalars as (1, 1) arrays
    if value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise InputError(f"{path}: {key} should be one number, got shape {value.shape} {value.dtype}")
    return float(value.ravel()[0])


def float_vector(f, key, path, allow_row=False) -> np.ndarray:
    """Non-empty, finite 1-D float64 array at ``key`` (also (1, n) with ``allow_row``)."""
    value = np.asarray(require(f, key, path)[()])
    if allow_row and value.ndim == 2 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 1 or value.size == 0 or not np.issubdtype(value.dtype, np.number):
        raise InputError(f"{path}: {key} should be a non-empty 1-D numeric array, got shape {value.shape}")
    value = value.astype(np.float64)
    if not np.all(np.isfinite(value)):
        raise InputError(f"{path}: {key} holds non-finite values")
    return value


def int_vector(f, key, path) -> np.ndarray:
    """1-D int64 array at ``key`` (stored as any integer type); InputError otherwise."""
    value = np.asarray(require(f, key, path)[()])
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
        raise InputError(
            f"{path}: {key} should be a 1-D integer array, got shape {value.shape} {value.dtype}"
        )
    return value.astype(np.int64)


def decode(value) -> str:
    """An HDF5 string value (bytes or str) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (for one-line errors)."""
    return " ".join(str(exc).split())
