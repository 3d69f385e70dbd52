"""Read APS 8-ID-I two-time result files (DESIGN.md §3).

Two layouts are understood, told apart by their keys:

``aps-u`` (NeXus result written by boost_corr)
    maps ``/xpcs/twotime/correlation_map/c2_NNNNN``; the i-th map in sorted name order
    belongs to the 1-based dynamic bin ``/xpcs/twotime/processed_bins[i]``; the bin is
    placed on the grid ``/xpcs/qmap/dynamic_v_list_dim0 × dynamic_v_list_dim1`` through
    ``dynamic_index_mapping``, ``dynamic_num_pts`` and ``map_names``. Time step
    dt = ``/entry/instrument/detector_1/frame_time`` × ``/xpcs/twotime/config/stride_frame``
    × ``/xpcs/twotime/config/avg_frame`` (all three required).
``legacy`` (older APS layout)
    maps ``/exchange/C2T_all/g2_NNNNN``; the i-th map in sorted name order has q
    ``/xpcs/dqlist[0, i]`` and phi ``/xpcs/dphilist[0, i]``; the q (phi) grid is the
    sorted unique list of those values. Time step dt =
    ``/measurement/instrument/detector/exposure_period`` × ``/xpcs/avg_frames`` ×
    ``/xpcs/stride_frames``; the last two are taken as 1 when absent (documented
    default: older files written without frame averaging or striding omit them).

Everything here is cheap metadata work except :class:`C2Reader`, which reads the slices
of the maps that a dask chunk needs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from xpcsfit.errors import InputError

APSU_MAPS = "/xpcs/twotime/correlation_map"
APSU_BINS = "/xpcs/twotime/processed_bins"
APSU_Q = "/xpcs/qmap/dynamic_v_list_dim0"
APSU_PHI = "/xpcs/qmap/dynamic_v_list_dim1"
APSU_INDEX_MAPPING = "/xpcs/qmap/dynamic_index_mapping"
APSU_NUM_PTS = "/xpcs/qmap/dynamic_num_pts"
APSU_MAP_NAMES = "/xpcs/qmap/map_names"
APSU_FRAME_TIME = "/entry/instrument/detector_1/frame_time"
APSU_STRIDE = "/xpcs/twotime/config/stride_frame"
APSU_AVG = "/xpcs/twotime/config/avg_frame"

LEGACY_MAPS = "/exchange/C2T_all"
LEGACY_Q = "/xpcs/dqlist"
LEGACY_PHI = "/xpcs/dphilist"
LEGACY_EXPOSURE = "/measurement/instrument/detector/exposure_period"
LEGACY_AVG = "/xpcs/avg_frames"
LEGACY_STRIDE = "/xpcs/stride_frames"

_APSU_NAME = re.compile(r"^c2_(\d+)$")
_LEGACY_NAME = re.compile(r"^g2_(\d+)$")
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
        raise InputError(f"{path}: cannot open as HDF5 ({_one_line(exc)})") from exc


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
        if layout == "aps-u":
            q_grid, phi_grid, maps = _apsu_maps(f, path)
        else:
            q_grid, phi_grid, maps = _legacy_maps(f, path)
        n_frames = _check_map_shapes(f, path, maps.values())
    return FileInfo(path.resolve(), layout, q_grid, phi_grid, maps, n_frames)


def detect_layout(f: h5py.File, path: Path) -> str:
    """Return ``"aps-u"`` or ``"legacy"`` from the map group present in ``f``.

    Raises
    ------
    InputError
        Neither or both map groups are present.
    """
    apsu, legacy = APSU_MAPS in f, LEGACY_MAPS in f
    if apsu and legacy:
        raise InputError(f"{path}: holds both {APSU_MAPS} and {LEGACY_MAPS}; layout is ambiguous")
    if apsu:
        return "aps-u"
    if legacy:
        return "legacy"
    raise InputError(
        f"{path}: missing key {APSU_MAPS} (APS-U layout) or {LEGACY_MAPS} (legacy layout)"
    )


def read_dt(path: str | Path, layout: str) -> float:
    """Two-time step dt (s) from the file's timing keys (see module docstring).

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
        A timing key is missing (stride/avg only for APS-U), or a value is not finite
        and positive; the message names the key.
    """
    path = Path(path)
    with open_h5(path) as f:
        if layout == "aps-u":
            keys = [(APSU_FRAME_TIME, True), (APSU_STRIDE, True), (APSU_AVG, True)]
        else:
            keys = [(LEGACY_EXPOSURE, True), (LEGACY_AVG, False), (LEGACY_STRIDE, False)]
        dt = 1.0
        for key, required in keys:
            if key not in f and not required:
                continue
            value = _scalar(f, key, path)
            if not (np.isfinite(value) and value > 0):
                raise InputError(f"{path}: {key} = {value!r} is not a finite positive number")
            dt *= value
    return float(dt)


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


def _apsu_maps(f: h5py.File, path: Path):
    names = _sorted_map_names(f, path, APSU_MAPS, _APSU_NAME, "c2_NNNNN")
    bins = _int_vector(f, APSU_BINS, path)
    if bins.size != len(names):
        raise InputError(
            f"{path}: {APSU_BINS} has {bins.size} entries but {APSU_MAPS} holds {len(names)} maps"
        )
    dim0 = _float_vector(f, APSU_Q, path)
    dim1 = _float_vector(f, APSU_PHI, path)
    mapping = _int_vector(f, APSU_INDEX_MAPPING, path)
    num_pts = _int_vector(f, APSU_NUM_PTS, path)
    if num_pts.size != 2 or tuple(num_pts) != (dim0.size, dim1.size):
        raise InputError(
            f"{path}: {APSU_NUM_PTS} = {num_pts.tolist()} does not match the grid sizes "
            f"({dim0.size}, {dim1.size}) of {APSU_Q} and {APSU_PHI}"
        )
    map_names = [_decode(v).strip().lower() for v in np.ravel(_require(f, APSU_MAP_NAMES, path)[()])]
    if map_names == ["q", "phi"]:
        q_dim = 0
    elif map_names == ["phi", "q"]:
        q_dim = 1
    else:
        raise InputError(f"{path}: {APSU_MAP_NAMES} = {map_names} is neither [q, phi] nor [phi, q]")
    n_cells = dim0.size * dim1.size
    maps: dict[tuple[int, int], str] = {}
    for name, b in zip(names, bins):
        if not 1 <= b <= mapping.size:
            raise InputError(
                f"{path}: {APSU_BINS} value {b} (map {name}) outside {APSU_INDEX_MAPPING} "
                f"(1..{mapping.size})"
            )
        absolute = int(mapping[b - 1])
        if not 0 <= absolute < n_cells:
            raise InputError(
                f"{path}: {APSU_INDEX_MAPPING}[{b - 1}] = {absolute} outside the "
                f"{dim0.size}x{dim1.size} grid"
            )
        # pyXpcsViewer rule: absolute = i0 * n_dim1 + i1
        i0, i1 = divmod(absolute, dim1.size)
        cell = (i0, i1) if q_dim == 0 else (i1, i0)
        if cell in maps:
            raise InputError(
                f"{path}: maps {maps[cell].rsplit('/', 1)[1]} and {name} both belong to bin "
                f"(q index {cell[0]}, phi index {cell[1]})"
            )
        maps[cell] = f"{APSU_MAPS}/{name}"
    q_grid, phi_grid = (dim0, dim1) if q_dim == 0 else (dim1, dim0)
    return q_grid, phi_grid, maps


def _legacy_maps(f: h5py.File, path: Path):
    names = _sorted_map_names(f, path, LEGACY_MAPS, _LEGACY_NAME, "g2_NNNNN")
    qs = _round_rel(_float_vector(f, LEGACY_Q, path, allow_row=True))
    phis = _round_rel(_float_vector(f, LEGACY_PHI, path, allow_row=True))
    for key, values in ((LEGACY_Q, qs), (LEGACY_PHI, phis)):
        if values.size != len(names):
            raise InputError(
                f"{path}: {key} has {values.size} entries but {LEGACY_MAPS} holds {len(names)} maps"
            )
    q_grid, phi_grid = np.unique(qs), np.unique(phis)
    maps: dict[tuple[int, int], str] = {}
    for name, q, phi in zip(names, qs, phis):
        cell = (int(np.searchsorted(q_grid, q)), int(np.searchsorted(phi_grid, phi)))
        if cell in maps:
            raise InputError(
                f"{path}: maps {maps[cell].rsplit('/', 1)[1]} and {name} both have "
                f"q={q:.6g}, phi={phi:.6g}"
            )
        maps[cell] = f"{LEGACY_MAPS}/{name}"
    return q_grid, phi_grid, maps


def _sorted_map_names(f, path, group, pattern, what):
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


def _require(f, key, path):
    if key not in f:
        raise InputError(f"{path}: missing key {key}")
    obj = f[key]
    if not isinstance(obj, h5py.Dataset):
        raise InputError(f"{path}: {key} is a group, expected a dataset")
    return obj


def _scalar(f, key, path) -> float:
    value = np.asarray(_require(f, key, path)[()])
    # legacy files often store scalars as (1, 1) arrays
    if value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise InputError(f"{path}: {key} should be one number, got shape {value.shape} {value.dtype}")
    return float(value.ravel()[0])


def _float_vector(f, key, path, allow_row=False) -> np.ndarray:
    value = np.asarray(_require(f, key, path)[()])
    if allow_row and value.ndim == 2 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 1 or value.size == 0 or not np.issubdtype(value.dtype, np.number):
        raise InputError(f"{path}: {key} should be a non-empty 1-D numeric array, got shape {value.shape}")
    value = value.astype(np.float64)
    if not np.all(np.isfinite(value)):
        raise InputError(f"{path}: {key} holds non-finite values")
    return value


def _int_vector(f, key, path) -> np.ndarray:
    value = np.asarray(_require(f, key, path)[()])
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
        raise InputError(
            f"{path}: {key} should be a 1-D integer array, got shape {value.shape} {value.dtype}"
        )
    return value.astype(np.int64)


def _round_rel(values: np.ndarray) -> np.ndarray:
    """Round to 10 significant digits so that equal bins compare equal (1e-9 relative)."""
    return np.array([float(f"{v:.9e}") for v in values], dtype=np.float64)


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
