"""fitted.zarr: the fitted model and residual of a fit, written tile by tile.

Zarr v3, readable with ``xarray.open_zarr``: ``c2_fit`` and ``residual`` with dims
(q, phi, t1, t2), chunks (1, n_phi, tile, tile) — the fit's tiles, each written whole by
the worker that holds it; tiles wholly below the diagonal are not written (NaN fill).
The result directory it is written into is claimed and committed by
:mod:`xpcsfit.io.atomic`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from xpcsfit.engine.kernel import Tile, tile_model
from xpcsfit.parameters import ParameterLayout


def create_fitted_store(path: Path, q, phi, t, tile: int) -> None:
    """Create fitted.zarr metadata (arrays c2_fit and residual, coordinates)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    n_t = len(t)
    shape = (len(q), len(phi), n_t, n_t)
    for name in ("c2_fit", "residual"):
        root.create_array(name, shape=shape, chunks=(1, len(phi), tile, tile), dtype="float32",
                          fill_value=np.nan, dimension_names=("q", "phi", "t1", "t2"))
    for name, values, unit in (("q", q, "1/Å"), ("phi", phi, "deg"), ("t1", t, "s"), ("t2", t, "s")):
        arr = root.create_array(name, shape=(len(values),), dtype="float64",
                                dimension_names=(name,))
        arr[:] = np.asarray(values, float)
        arr.attrs["units"] = unit


def write_fitted_tile(tile: Tile, x, layout: ParameterLayout, mode: str, L: float,
                      path: str, lead: int) -> np.ndarray:
    """Worker task: write this tile's model and residual chunks into the store at ``path``.

    ``lead`` is the number of unfitted frames before the first fitted one in the store
    (it starts at a frame that is a multiple of the tile size, so a tile is one chunk).
    Returns the model on the tile grid, (n_phi, size, size) float64 (padding included),
    for the caller's pictures.
    """
    model = tile_model(tile, x, layout, mode, L)
    iq = tile.index[0]
    r0, c0 = tile.start[0] + lead, tile.start[1] + lead
    n1, n2 = tile.extent
    w = tile.weight[:n1, :n2] > 0
    fit = np.where(w, model[:, :n1, :n2], np.nan).astype(np.float32)
    resid = np.where(w, tile.c2[:, :n1, :n2] - model[:, :n1, :n2], np.nan).astype(np.float32)
    region = (slice(iq, iq + 1), slice(None), slice(r0, r0 + n1), slice(c0, c0 + n2))
    root = zarr.open_group(path, mode="r+")
    root["c2_fit"][region] = fit[None]
    root["residual"][region] = resid[None]
    return model
