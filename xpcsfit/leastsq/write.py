"""A fit's result directory: fit.json, fitted.zarr and the PNGs, from one pass over the
tiles (each worker writes its tiles' fitted.zarr chunks and sends back only what the
pictures need)."""

from __future__ import annotations

import json
import time

import numpy as np

from xpcsfit.io.result_dir import result_manifest
from xpcsfit.leastsq.output import (
    create_fitted_store,
    cut_rows,
    gather_g2_cuts,
    tile_g2_cuts,
    write_fitted_tile,
    write_g2_cuts,
)


def write_result_directory(tmp, result, ds, evaluator, layout, cfg, L, size, started):
    """Write fit.json, fitted.zarr and the PNGs into the partial result directory ``tmp``
    (committed by the caller: :mod:`xpcsfit.io.result_dir`). ``started``: the fit's
    ``time.perf_counter()`` at its start, for ``wall_time_s``.

    One pass over the tiles on the workers writes fitted.zarr and sends back only the
    points of the heatmap grid (every ``stride_for(T)``-th frame, at most MAX_PIXELS
    across), so neither the input nor fitted.zarr is read again, and the driver holds
    about 2 × n_q × n_phi × MAX_PIXELS² float32 whatever the number of frames.
    """
    # Imported here, not with xpcsfit: matplotlib takes ~0.6 s to import, paid only by a
    # fit that writes its pictures.
    from xpcsfit.leastsq import plots

    t = ds["t1"].values
    first = int(ds.attrs["frames"][0])
    lead = first % size  # fitted.zarr starts at an aligned frame: its chunks are the tiles
    t_out = (np.arange(-lead, t.size) + first) * float(ds.attrs["dt"])
    s = plots.stride_for(t.size)
    m = len(range(0, t.size, s))
    store = tmp / "fitted.zarr"
    create_fitted_store(store, ds["q"].values, ds["phi"].values, t_out, size)
    with evaluator.phase("write outputs"):
        rows = cut_rows(t.size)
        samples = evaluator.map_tiles("write-outputs", write_tile_outputs, result.x, layout, cfg.mode, L, str(store),
                                      lead, s, rows)
    cuts = gather_g2_cuts([c for *_, c in samples], evaluator.bin_starts, layout.n_q, layout.n_phi, rows.size,
                          t.size)
    lags = np.arange(t.size) * float(ds.attrs["dt"])
    write_g2_cuts(store, t[rows], lags, *cuts)
    plots.g2_cuts_png(tmp / "g2_cuts.png", lags, t[rows], *cuts, result.q)
    data = np.full((layout.n_q, layout.n_phi, m, m), np.nan, np.float32)
    model = np.full_like(data, np.nan)
    while samples:  # pop: each sample is freed once copied into the grids
        iq, g1, g2, d, f, _ = samples.pop()
        n1, n2 = d.shape[1:]
        data[iq, :, g1 : g1 + n1, g2 : g2 + n2] = d
        model[iq, :, g1 : g1 + n1, g2 : g2 + n2] = f
    for iq, qv in enumerate(result.q):
        plots.heatmap_pngs([tmp / f"c2_q{iq}_phi{ip}.png" for ip in range(layout.n_phi)], t[::s], data[iq],
                           model[iq], [f"q = {qv:.5g} 1/Å, phi = {pv:.4g}°" for pv in result.phi])
    plots.transport_png(tmp / "transport.png", result.transport, cfg.mode)
    result.wall_time_s = time.perf_counter() - started
    record = result.to_dict() | {"files": result_manifest(tmp)}
    (tmp / "fit.json").write_text(json.dumps(record, indent=1, allow_nan=True))


def write_tile_outputs(tile, x, layout, mode, L, path, lead, stride, cut_rows):
    """Worker task: write one tile's fitted.zarr chunks, return its heatmap-grid points
    and its part of the g2(τ) cuts at the dataset rows ``cut_rows``.

    The heatmap grid is dataset frames 0, stride, 2·stride, … along t1 and t2.

    Returns
    -------
    (q position, first grid row, first grid column, data, model, cuts)
        ``data`` and ``model`` (n_phi, rows, columns) float32: the tile's c2 and fitted
        c2 on the grid points it holds, NaN where not fitted (t2 <= t1); ``cuts`` from
        :func:`xpcsfit.leastsq.output.tile_g2_cuts`.
    """
    fitted = write_fitted_tile(tile, x, layout, mode, L, path, lead)
    (r0, c0), (n1, n2) = tile.start, tile.extent
    i0, j0 = -r0 % stride, -c0 % stride  # first tile row / column on the grid
    rows, cols = slice(i0, n1, stride), slice(j0, n2, stride)
    w = tile.weight[rows, cols] > 0
    data = np.where(w, tile.c2[:, rows, cols], np.nan).astype(np.float32)
    model = np.where(w, fitted[:, rows, cols], np.nan).astype(np.float32)
    return (tile.index[0], (r0 + i0) // stride, (c0 + j0) // stride, data, model,
            tile_g2_cuts(tile, fitted, cut_rows))
