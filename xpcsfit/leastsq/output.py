"""fitted.zarr: the fitted model and residual of a fit, written tile by tile.

Zarr v3, readable with ``xarray.open_zarr``: ``c2_fit`` and ``residual`` with dims
(q, phi, t1, t2), chunks (1, n_phi, tile, tile) — the fit's tiles, each written whole by
the worker that holds it; tiles wholly below the diagonal are not written (NaN fill).
Beside them, small arrays of g2(τ) cuts (:func:`tile_g2_cuts`, :func:`write_g2_cuts`):
``g2_cut_data`` and ``g2_cut_fit`` (q, phi, age, lag), c2(t_age, t_age + τ) of the data
and the fit at a few sample ages, and ``residual_by_lag`` (q, phi, lag), the mean
residual at each lag over the whole map.
The result directory it is written into is claimed and committed by
:mod:`xpcsfit.io.atomic`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from xpcsfit.engine.kernel import Tile, tile_lag_sums, tile_model
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


def cut_rows(n_t: int, n_cuts: int = 4) -> np.ndarray:
    """Dataset rows (sample ages) of the g2(τ) cuts: n_cuts spread over the first 80 %
    of the window (a later age has too few lags to show a decay)."""
    return np.unique(np.linspace(0, 0.8 * (n_t - 1), n_cuts).round().astype(int))


def tile_g2_cuts(tile: Tile, model: np.ndarray, rows: np.ndarray) -> dict:
    """Worker side: this tile's part of the g2(τ) cuts and of the residual by lag.

    ``model`` (n_phi, size, size) the fitted c2 on the tile; ``rows`` the cut rows
    (:func:`cut_rows`). Returns {"q": q position, "cuts": [(cut index, first lag,
    data (n_phi, n), fit (n_phi, n))], "lag_sums": :func:`tile_lag_sums` of the residual}.
    """
    (r0, c0), (n1, n2) = tile.start, tile.extent
    cuts = []
    for k, row in enumerate(rows):
        i = int(row) - r0
        if not 0 <= i < n1:
            continue
        fitted = tile.weight[i, :n2] > 0
        if not fitted.any():
            continue
        j = np.flatnonzero(fitted)
        cuts.append((k, c0 + int(j[0]) - int(row), tile.c2[:, i, j].astype(np.float32),
                     model[:, i, j].astype(np.float32)))
    resid = (tile.c2.astype(float) - model) * tile.weight[None]
    return {"q": tile.index[0], "cuts": cuts, "lag_sums": tile_lag_sums(tile, resid)}


def gather_g2_cuts(parts: list[dict], bin_starts: list[int], n_q: int, n_phi: int, n_cuts: int,
                   n_t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cut arrays from every tile's :func:`tile_g2_cuts`: data and fit (n_q, n_phi,
    n_cuts, n_t) by lag in frames (NaN where a cut has no point), and the mean residual
    by lag (n_q, n_phi, n_t)."""
    from xpcsfit.engine.kernel import add_lag_sums

    data = np.full((n_q, n_phi, n_cuts, n_t), np.nan, np.float32)
    fit = np.full_like(data, np.nan)
    for part in parts:
        for k, lag0, d, f in part["cuts"]:
            data[part["q"], :, k, lag0 : lag0 + d.shape[1]] = d
            fit[part["q"], :, k, lag0 : lag0 + d.shape[1]] = f
    sums, counts, _ = add_lag_sums([p["lag_sums"] for p in parts], bin_starts, n_q * n_phi, n_phi, n_t)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)
    return data, fit, mean.reshape(n_q, n_phi, n_t)


def write_g2_cuts(path: Path, ages, lags, data, fit, residual_by_lag) -> None:
    """Add the g2(τ) cut arrays (see the module doc) to the fitted.zarr at ``path``;
    ``ages`` (n_cuts,) and ``lags`` (n_lags,) in s."""
    root = zarr.open_group(str(path), mode="r+")
    for name, values, dims in (("g2_cut_data", data, ("q", "phi", "age", "lag")),
                               ("g2_cut_fit", fit, ("q", "phi", "age", "lag")),
                               ("residual_by_lag", residual_by_lag, ("q", "phi", "lag"))):
        arr = root.create_array(name, shape=values.shape, dtype="float32", fill_value=np.nan,
                                dimension_names=dims)
        arr[:] = np.asarray(values, np.float32)
    for name, values in (("age", ages), ("lag", lags)):
        arr = root.create_array(name, shape=(len(values),), dtype="float64", dimension_names=(name,))
        arr[:] = np.asarray(values, float)
        arr.attrs["units"] = "s"
