"""The Zarr v3 store of an ingested measurement (DESIGN.md §4).

Layout (one root group, readable with ``xarray.open_zarr``)::

    c2   float32 (q, phi, t1, t2), chunks (1, n_phi, tile, tile), fill NaN
    q    float64 (q,)   1/Å      every q of the file that has two-time maps
    phi  float64 (phi,) deg      the file's whole phi grid
    t1, t2 float64      s        frame × dt, frames 0 … T-1

Root attributes: ``xpcsfit_store`` (format version), ``dt``, ``source`` (absolute path
of the HDF5 file), ``sha256`` (of its bytes), ``layout``, ``n_frames``, ``tile``,
``q_index`` (positions of the q coordinate in the file's q grid), ``q_grid`` (the file's
whole q grid) and ``has_map`` (bool per stored q × phi; slabs without a map stay NaN).

Every chunk holds all phi of one q over one time tile. Tiles wholly below the diagonal
are never written, and inside diagonal tiles the lower triangle is NaN.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import xarray as xr
import zarr

from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io import hdf5 as _hdf
from xpcsfit.io.atomic import atomic_directory
from xpcsfit.io.h5values import one_line

STORE_VERSION = 1


class Ingested(NamedTuple):
    """Result of :func:`ingest`.

    Attributes
    ----------
    path : Path
        Absolute path of the store.
    created : bool
        True if this call wrote the store; False if it already held the same source
        (same sha256) and nothing was done.
    """

    path: Path
    created: bool


def ingest(source: str | Path, store: str | Path, *, tile: int = 256, gap: float | None = None) -> Ingested:
    """Copy the two-time maps of an HDF5 result file into a Zarr v3 store.

    All q that have maps, all phi and all frames are copied, one q and one band of
    ``tile`` rows at a time (memory ~ n_phi × tile × T × 4 bytes). The store is built
    in a sibling ``STORE.partial-<random>`` directory and renamed when complete
    (:func:`xpcsfit.io.atomic.atomic_directory`), so a failed ingest leaves nothing at
    ``store``.

    Parameters
    ----------
    source : str or Path
        APS-U or legacy HDF5 result file.
    store : str or Path
        Directory of the store to create.
    tile : int
        Side of the (t1, t2) chunks, frames. Ignored when the store already exists.
    gap : float, optional
        Gap L of the sample, Å, recorded as the store attribute ``L`` (result files do
        not record it); fits of the store then use it unless given another.

    Returns
    -------
    Ingested
        ``(path, created)``; ``created`` is False when ``store`` already held this very
        file (same sha256): then nothing was written.

    Raises
    ------
    InputError
        Bad source file (see :func:`xpcsfit.io.hdf5.read_info`, :func:`~xpcsfit.io.hdf5.read_dt`),
        ``store`` exists and holds another file, or exists and is not an xpcsfit store.
    ConfigError
        ``tile`` is not a positive integer, or ``gap`` is not a finite positive number.
    """
    source, store = Path(source), Path(store)
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(f"tile = {tile!r}: must be a positive integer")
    if gap is not None and not (np.isfinite(gap) and gap > 0):
        raise ConfigError(f"gap = {gap!r}: must be a finite positive number of Å")
    info = _hdf.read_info(source)
    digest = _hdf.sha256_file(source)
    if store.exists() or store.is_symlink():
        return _existing(store, digest)
    dt = _hdf.read_dt(source, info.layout)

    try:
        with atomic_directory(store) as tmp:
            _write_store(tmp, info, digest, dt, int(tile), gap)
    except FileExistsError:
        if not (store.exists() or store.is_symlink()):
            raise
        return _existing(store, digest)  # another process finished the same store first
    return Ingested(store.resolve(), True)


def open_store(store: str | Path) -> xr.Dataset:
    """Open an xpcsfit store lazily (dask-backed c2, chunks as stored).

    Parameters
    ----------
    store : str or Path
        Store directory written by :func:`ingest`.

    Returns
    -------
    xarray.Dataset
        The whole store: c2 (q, phi, t1, t2) and the root attributes.

    Raises
    ------
    InputError
        Not an xpcsfit store, or its attributes are incomplete.
    """
    store = Path(store)
    attrs = store_attrs(store)
    ds = xr.open_zarr(store, consolidated=False, chunks={})
    if "c2" not in ds or ds["c2"].dims != ("q", "phi", "t1", "t2"):
        raise InputError(f"{store}: no c2 array with dims (q, phi, t1, t2)")
    ds.attrs = attrs
    return ds


def store_attrs(store: Path) -> dict:
    """Root attributes of an xpcsfit store; InputError if ``store`` is not one."""
    if not (store / "zarr.json").is_file():
        raise InputError(f"{store}: exists but is not an xpcsfit store (no zarr.json)")
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3)
    except Exception as exc:  # zarr raises several types for unreadable metadata
        raise InputError(
            f"{store}: exists but is not a readable Zarr v3 group ({one_line(exc)})"
        ) from exc
    attrs = dict(group.attrs)
    if attrs.get("xpcsfit_store") != STORE_VERSION:
        raise InputError(f"{store}: exists but is not an xpcsfit store (no xpcsfit_store attribute)")
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise InputError(f"{store}: store attributes missing: {', '.join(missing)}")
    return attrs


_REQUIRED_ATTRS = ("dt", "source", "sha256", "layout", "n_frames", "tile", "q_index", "q_grid", "has_map")


def _existing(store: Path, digest: str) -> Ingested:
    attrs = store_attrs(store)
    if attrs["sha256"] != digest:
        raise InputError(
            f"{store}: already holds {attrs['source']} (sha256 {attrs['sha256'][:16]}…); "
            "choose another store path"
        )
    return Ingested(store.resolve(), False)


def _write_store(tmp: Path, info: _hdf.FileInfo, digest: str, dt: float, tile: int, gap) -> None:
    has_map = info.has_map()
    q_index = sorted(np.flatnonzero(has_map.any(axis=1)).tolist(), key=lambda i: info.q_grid[i])
    n_q, n_phi, n = len(q_index), info.phi_grid.size, info.n_frames
    attrs = {
        "xpcsfit_store": STORE_VERSION,
        "dt": float(dt),
        "source": str(info.path),
        "sha256": digest,
        "layout": info.layout,
        "n_frames": int(n),
        "tile": int(tile),
        "q_index": [int(i) for i in q_index],
        "q_grid": [float(v) for v in info.q_grid],
        "has_map": has_map[q_index].tolist(),
    }
    if gap is not None:
        attrs["L"] = float(gap)
    # metadata is written here, once, before any chunk
    root = zarr.open_group(tmp, mode="w-", zarr_format=3, attributes=attrs)
    c2 = root.create_array(
        "c2",
        shape=(n_q, n_phi, n, n),
        dtype="float32",
        chunks=(1, n_phi, tile, tile),
        fill_value=np.nan,
        dimension_names=("q", "phi", "t1", "t2"),
        config={"write_empty_chunks": False},
    )
    t = np.arange(n, dtype=np.float64) * dt
    coords = {
        "q": (info.q_grid[q_index], "1/Å"),
        "phi": (info.phi_grid, "deg"),
        "t1": (t, "s"),
        "t2": (t, "s"),
    }
    for name, (values, units) in coords.items():
        arr = root.create_array(
            name, shape=values.shape, dtype="float64", dimension_names=(name,), attributes={"units": units}
        )
        arr[:] = values
    _consolidate(tmp)

    with h5py.File(info.path, "r") as f:
        for out_q, iq in enumerate(q_index):
            datasets = [f[info.maps[(iq, ip)]] if has_map[iq, ip] else None for ip in range(n_phi)]
            for a in range(0, n, tile):
                _write_band(c2, out_q, datasets, a, min(a + tile, n), n)


def _consolidate(tmp: Path) -> None:
    # Consolidated metadata lets a plain ``xarray.open_zarr(store)`` open the store
    # without its fallback warning. zarr warns that consolidation is an extension of
    # the v3 spec; that is known and accepted here, so only that warning is muted.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(tmp)


def _write_band(c2, out_q: int, datasets, a: int, b: int, n: int) -> None:
    """Write rows a:b, columns a:n (whole chunks from the diagonal tile on) of one q."""
    band = np.full((len(datasets), b - a, n - a), np.nan, dtype=np.float32)
    for ip, ds in enumerate(datasets):
        if ds is not None:
            band[ip] = ds[a:b, a:n]
    band[:, np.arange(a, n)[None, :] < np.arange(a, b)[:, None]] = np.nan
    c2[out_q, :, a:b, a:n] = band
