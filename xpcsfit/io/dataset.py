"""``open_dataset``: one lazy (q, phi, t1, t2) view of an HDF5 result file or a store.

The returned :class:`xarray.Dataset` is the contract between input and the fit engine:
c2 is float32, dask-backed, NaN below the diagonal, t1/t2 relative to the first
selected frame A (dataset index 0 = frame A, time = frame × dt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from xpcsfit.config import short_repr
from xpcsfit.engine.tiles import tile_edges
from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io import hdf5 as _hdf
from xpcsfit.io import store as _store
from xpcsfit.io.finite import require_finite
from xpcsfit.io.h5values import one_line

Q_TOLERANCE = 0.05  # relative distance allowed between a requested q and a grid q
EAGER_FINITE_LIMIT = 2e8  # elements; at or below, open_dataset checks NaN/Inf at open


@dataclass(frozen=True)
class _Grid:
    """What selection needs to know about a source."""

    name: str  # file or store path, for messages
    q_grid: np.ndarray  # (n_q_grid,) 1/Å, the file's whole q grid
    phi_grid: np.ndarray  # (n_phi_grid,) deg
    has_map: np.ndarray  # (n_q_grid, n_phi_grid) bool
    n_frames: int


def open_dataset(
    path: str | Path,
    *,
    q: float | Sequence[float] | None = None,
    q_index: int | Sequence[int] | None = None,
    phi: Sequence[float] | None = None,
    frames: tuple[int, int] | None = None,
    dt: float | None = None,
    tile: int = 256,
    check_finite: bool = True,
) -> xr.Dataset:
    """Open two-time maps lazily as an xarray Dataset.

    Parameters
    ----------
    path : str or Path
        APS-U or legacy HDF5 result file, or a Zarr store written by
        :func:`xpcsfit.io.store.ingest`.
    q : float or sequence of float, optional
        q values, 1/Å; each selects the nearest q of the file grid that has two-time
        maps (within 5 % relative). Exclusive with ``q_index``.
    q_index : int or sequence of int, optional
        Positions in the file's q grid. Neither given: every q that has maps.
    phi : sequence of float, optional
        Angles, degrees, each matched to the nearest phi bin (within half the smallest
        bin spacing, 1° with one bin). None: all phi bins.
    frames : (int, int), optional
        Inclusive 0-based frame range (A, B), 1 <= A < B <= T-1. Default (1, T-1):
        frame 0 sits at t = 0 where t**alpha is singular.
    dt : float, optional
        Time step, s, within :data:`xpcsfit.io.hdf5.DT_RANGE`; default from the file
        (see :mod:`xpcsfit.io.apsu`, :mod:`xpcsfit.io.legacy`) or the store.
    tile : int
        Chunk side in t1 and t2 for HDF5 input; a store keeps its own chunks.
    check_finite : bool
        Check for NaN/Inf above the diagonal now (reads all the data once, when the
        selection has at most 2e8 elements). ``fit`` passes False: its tiles are
        checked as the workers load them.

    Returns
    -------
    xarray.Dataset
        ``c2`` (q, phi, t1, t2) float32, dask-backed, chunks (1, n_phi, tile, tile)
        with edges at absolute frame multiples of ``tile`` (HDF5 input; the first and
        last chunks along t may be shorter),
        NaN below the diagonal. Coordinates q (1/Å), phi (deg), t1, t2 (s, = frame ×
        dt). Attributes dt, frames [A, B], n_frames, source, sha256, layout,
        q_index and, for a store, store, tile and (when given at ingest) L, Å.

    Raises
    ------
    InputError
        Missing path, unknown or malformed file/store, dt in the file not positive,
        a selected (q, phi) without a map, non-finite c2 above the diagonal (checked
        at open when ``check_finite`` and the selection has at most 2e8 elements).
    ConfigError
        Bad selection or option (q, q_index, phi, frames, dt, tile).
    """
    path = Path(path)
    tile = _check_tile(tile)
    if not path.exists():
        raise InputError(f"{path}: no such file or store")
    if path.is_dir():
        ds = _open_from_store(path, q, q_index, phi, frames, dt)
    elif path.is_file():
        ds = _open_from_hdf(path, q, q_index, phi, frames, dt, tile)
    else:
        raise InputError(f"{path}: neither an HDF5 file nor a Zarr store")
    n_q, n_phi, n_t, _ = ds["c2"].shape
    if check_finite and n_q * n_phi * n_t * n_t <= EAGER_FINITE_LIMIT:
        frames = np.arange(n_t)  # t1 and t2 share one frame origin
        require_finite(ds["c2"].data, frames, frames, source=ds.attrs["source"],
                       q=ds["q"].values, phi=ds["phi"].values)
    return ds


def _open_from_hdf(path, q, q_index, phi, frames, dt, tile) -> xr.Dataset:
    info = _hdf.read_info(path)
    grid = _Grid(str(path), info.q_grid, info.phi_grid, info.has_map(), info.n_frames)
    q_sel, phi_sel, frame_range = _select(grid, q, q_index, phi, frames)
    dt = _check_dt(dt) if dt is not None else _hdf.read_dt(path, info.layout)
    keys = [[info.maps[(iq, ip)] for ip in phi_sel] for iq in q_sel]
    digest = _hdf.sha256_file(info.path)
    reader = _ReadErrors(_hdf.C2Reader(info.path, keys, frame_range, token=digest))
    # Chunk edges at absolute frame multiples of ``tile``, like the fit's tiles, so
    # that loading one tile is one read.
    n_t = frame_range[1] - frame_range[0] + 1
    edges = tuple(b - a for a, b in tile_edges(frame_range[0], n_t, tile))
    c2 = da.from_array(
        reader,
        chunks=(1, len(phi_sel), edges, edges),
        asarray=True,
        lock=False,
        meta=np.empty((0, 0, 0, 0), dtype=np.float32),
    )
    attrs = {"source": str(info.path), "sha256": digest, "layout": info.layout}
    return _build(c2, grid, q_sel, phi_sel, frame_range, dt, attrs)


class _ReadErrors:
    """A C2Reader whose HDF5 read failures are InputErrors naming the file.

    The metadata checks at open cannot see a damaged data chunk (h5py: "filter returned
    failure during read"); it is found when a worker reads it, and must end as the
    same one-line error as any other bad input, not as an OSError traceback.
    """

    def __init__(self, reader: _hdf.C2Reader):
        self.reader = reader
        self.shape, self.dtype, self.ndim = reader.shape, reader.dtype, reader.ndim

    def __dask_tokenize__(self):
        return self.reader.__dask_tokenize__()

    def __getitem__(self, key) -> np.ndarray:
        try:
            return self.reader[key]
        except (OSError, KeyError, RuntimeError) as exc:
            raise InputError(
                f"{self.reader.path}: cannot read the two-time maps ({one_line(exc)})"
            ) from None


def _open_from_store(path, q, q_index, phi, frames, dt) -> xr.Dataset:
    raw = _store.open_store(path)
    a = raw.attrs
    stored_q, q_grid, phi_grid, has_stored = _store_grid(path, raw)
    has_map = np.zeros((q_grid.size, phi_grid.size), dtype=bool)
    has_map[stored_q] = has_stored
    grid = _Grid(str(path), q_grid, phi_grid, has_map, int(a["n_frames"]))
    q_sel, phi_sel, (first, last) = _select(grid, q, q_index, phi, frames)
    dt = _check_dt(dt) if dt is not None else float(a["dt"])
    c2 = raw["c2"].data
    c2 = c2[[stored_q.index(i) for i in q_sel]]
    if phi_sel != list(range(phi_grid.size)):
        c2 = c2[:, phi_sel]
    c2 = c2[:, :, first : last + 1, first : last + 1]
    attrs = {
        "source": a["source"],
        "sha256": a["sha256"],
        "layout": a["layout"],
        "store": str(path.resolve()),
        "tile": int(a["tile"]),
    }
    if "L" in a:
        attrs["L"] = float(a["L"])
    return _build(c2, grid, q_sel, phi_sel, (first, last), dt, attrs)


def _store_grid(path: Path, raw: xr.Dataset):
    """Validate the store attributes that open_dataset and fit use.

    Returns (stored q positions, q grid, phi grid, has_map of the stored q). A store
    edited by hand (or damaged) gets an InputError naming the attribute.
    """
    a = raw.attrs
    shape = raw["c2"].shape

    def bad(key, why):
        return InputError(f"{path}: store attribute {key} = {short_repr(a.get(key))} {why}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    n = a["n_frames"]
    if not (is_int(n) and n >= 3 and tuple(shape[2:]) == (n, n)):
        raise bad("n_frames", f"does not match c2 of shape {tuple(shape)}")
    if not (is_int(a["tile"]) and a["tile"] >= 1):
        raise bad("tile", "is not a positive integer")
    if not (is_real(a["dt"]) and _hdf.DT_RANGE[0] <= a["dt"] <= _hdf.DT_RANGE[1]):
        raise bad("dt", f"is not a number in {_hdf.DT_RANGE[0]:g} .. {_hdf.DT_RANGE[1]:g} s")
    if "L" in a and not (is_real(a["L"]) and a["L"] > 0):
        raise bad("L", "is not a finite positive number (Å)")
    for key in ("source", "sha256", "layout"):
        if not isinstance(a[key], str):
            raise bad(key, "is not a string")
    q_grid = a["q_grid"]
    if not (isinstance(q_grid, list) and q_grid and all(is_real(v) for v in q_grid)):
        raise bad("q_grid", "is not a non-empty list of finite numbers")
    stored = a["q_index"]
    if not (isinstance(stored, list) and len(stored) == shape[0]
            and all(is_int(i) and 0 <= i < len(q_grid) for i in stored) and len(set(stored)) == len(stored)):
        raise bad("q_index", f"is not {shape[0]} distinct positions in q_grid")
    phi_grid = np.asarray(raw["phi"].values)
    if phi_grid.shape != (shape[1],) or phi_grid.dtype.kind not in "iuf" or not np.isfinite(phi_grid).all():
        raise InputError(f"{path}: store coordinate phi is not {shape[1]} finite numbers")
    has_map = np.asarray(a["has_map"])
    if has_map.dtype != bool or has_map.shape != tuple(shape[:2]):
        raise bad("has_map", f"is not a {shape[0]} x {shape[1]} array of booleans")
    return list(stored), np.asarray(q_grid, np.float64), phi_grid.astype(np.float64), has_map


def _build(c2, grid: _Grid, q_sel, phi_sel, frame_range, dt, attrs) -> xr.Dataset:
    first, last = frame_range
    t = np.arange(first, last + 1, dtype=np.float64) * dt
    coords = {
        "q": ("q", grid.q_grid[q_sel], {"units": "1/Å"}),
        "phi": ("phi", grid.phi_grid[phi_sel], {"units": "deg"}),
        "t1": ("t1", t, {"units": "s"}),
        "t2": ("t2", t.copy(), {"units": "s"}),
    }
    ds = xr.Dataset({"c2": (("q", "phi", "t1", "t2"), c2)}, coords=coords)
    ds.attrs = {
        "dt": float(dt),
        "frames": [int(first), int(last)],
        "n_frames": int(grid.n_frames),
        "source": attrs["source"],
        "sha256": attrs["sha256"],
        "layout": attrs["layout"],
        "q_index": [int(i) for i in q_sel],
    }
    for key in ("store", "tile", "L"):  # a store's path, chunk side and recorded gap
        if key in attrs:
            ds.attrs[key] = attrs[key]
    return ds


def _select(grid: _Grid, q, q_index, phi, frames):
    """Resolve q/q_index, phi and frames against a grid; check every map exists."""
    q_sel = _select_q(grid, q, q_index)
    phi_sel = _select_phi(grid, phi)
    for iq in q_sel:
        for ip in phi_sel:
            if not grid.has_map[iq, ip]:
                raise InputError(
                    f"{grid.name}: no two-time map for q={grid.q_grid[iq]:.6g} 1/Å (index {iq}), "
                    f"phi={grid.phi_grid[ip]:.6g} deg (index {ip})"
                )
    return q_sel, phi_sel, _select_frames(grid, frames)


def _select_q(grid: _Grid, q, q_index) -> list[int]:
    with_maps = np.flatnonzero(grid.has_map.any(axis=1))
    if q is not None and q_index is not None:
        raise ConfigError("give q or q_index, not both")
    if q is not None:
        values = _as_list(q, "q")
        chosen = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
                raise ConfigError(f"q = {v!r}: must be a finite number (1/Å)")
            grid_q = grid.q_grid[with_maps]
            k = int(np.argmin(np.abs(grid_q - v)))
            if abs(grid_q[k] - v) > Q_TOLERANCE * abs(grid_q[k]):
                avail = ", ".join(f"{x:.6g}" for x in grid_q)
                raise ConfigError(
                    f"q = {v:g} 1/Å: no q with two-time maps within 5 % in {grid.name}; available: {avail}"
                )
            chosen.append(int(with_maps[k]))
    elif q_index is not None:
        chosen = []
        for i in _as_list(q_index, "q_index"):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise ConfigError(f"q_index = {i!r}: must be an integer")
            if not 0 <= i < grid.q_grid.size:
                raise ConfigError(
                    f"q_index = {i}: out of range 0..{grid.q_grid.size - 1} of the q grid of {grid.name}"
                )
            if int(i) not in with_maps:
                raise ConfigError(
                    f"q_index = {i} (q={grid.q_grid[i]:.6g} 1/Å) has no two-time maps in {grid.name}; "
                    f"indices with maps: {with_maps.tolist()}"
                )
            chosen.append(int(i))
    else:
        chosen = with_maps.tolist()
    return sorted(set(chosen), key=lambda i: grid.q_grid[i])


def _select_phi(grid: _Grid, phi) -> list[int]:
    if phi is None:
        return list(range(grid.phi_grid.size))
    values = _as_list(phi, "phi")
    if not values:
        raise ConfigError("empty phi selection")
    spacing = np.diff(np.sort(grid.phi_grid))
    tol = 0.5 * spacing.min() if spacing.size else 1.0
    chosen = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
            raise ConfigError(f"phi = {v!r}: must be a finite number (deg)")
        k = int(np.argmin(np.abs(grid.phi_grid - v)))
        if abs(grid.phi_grid[k] - v) > tol:
            avail = ", ".join(f"{x:.4g}" for x in grid.phi_grid)
            raise ConfigError(
                f"phi = {v:g} deg: no phi bin within {tol:.3g} deg in {grid.name}; bins: {avail}"
            )
        chosen.add(k)
    return sorted(chosen, key=lambda i: grid.phi_grid[i])


def _select_frames(grid: _Grid, frames) -> tuple[int, int]:
    last = grid.n_frames - 1
    if frames is None:
        return 1, last
    try:
        first, final = frames
    except (TypeError, ValueError):
        raise ConfigError(f"frames = {frames!r}: expected two frame indices (A, B)") from None
    for v in (first, final):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"frames = {frames!r}: frame indices must be integers")
    first, final = int(first), int(final)
    if first == 0:
        raise ConfigError(
            "frames: frame 0 sits at t = 0 where t**alpha is singular; start at 1 or later"
        )
    if not 1 <= first < final <= last:
        raise ConfigError(
            f"frames = ({first}, {final}): need 1 <= A < B <= {last} ({grid.n_frames} frames in {grid.name})"
        )
    return first, final


def _check_dt(dt) -> float:
    numeric = isinstance(dt, (int, float, np.number)) and not isinstance(dt, bool)
    if not (numeric and np.isfinite(dt) and dt > 0):
        raise ConfigError(f"dt = {dt!r}: must be a finite number > 0 (s)")
    lo, hi = _hdf.DT_RANGE
    if not lo <= dt <= hi:
        raise ConfigError(f"dt = {dt!r}: outside {lo:g} .. {hi:g} s")
    return float(dt)


def _check_tile(tile) -> int:
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(f"tile = {tile!r}: must be a positive integer")
    return int(tile)


def _as_list(value, name) -> list:
    if isinstance(value, (str, bytes)):
        raise ConfigError(f"{name} = {value!r}: expected a number or a sequence of numbers")
    if np.ndim(value) == 0:
        return [value.item() if isinstance(value, np.generic) else value]
    return [v.item() if isinstance(v, np.generic) else v for v in np.asarray(value, dtype=object).ravel()]
