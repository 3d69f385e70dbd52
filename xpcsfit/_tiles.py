"""From a c2 Dataset to fit tiles: the grid, the skipped lower tiles, the padding.

A tile is one dask block of ``c2`` with dims (q, phi, t1, t2) and chunks
(1, n_phi, size, size): all phi angles of one q over one (t1, t2) time tile
(DESIGN.md §4). Blocks wholly below the diagonal hold no fitted point and are skipped;
edge blocks are padded to ``size`` so that every tile has one shape (one compiled
kernel) and the padding is masked by a zero weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import numpy as np
import xarray as xr

from ._errors import InputError
from ._kernel import Tile


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one fit, as lazy (dask.delayed) loads in a fixed order.

    Attributes
    ----------
    loads : list of dask.delayed.Delayed
        Each computes a :class:`~xpcsfit._kernel.Tile`.
    indices : list of (q position, row tile, column tile)
    size : int
        Tile edge in frames.
    n_points : int
        Fitted points (t2 > t1) over all bins.
    """

    loads: list
    indices: list[tuple[int, int, int]]
    size: int
    n_points: int


def make_tile(block, t1, t2, q, phi, bin_start, index, size, source) -> Tile:
    """Build a padded, masked :class:`Tile` from one c2 block.

    Parameters
    ----------
    block : ndarray (1, n_phi, n1, n2)
        c2 values, NaN below the diagonal.
    t1 : ndarray (n1,), t2 : ndarray (n2,)
        Times of the rows and columns, s.
    q : float, phi : ndarray (n_phi,)
    bin_start : int
    index : (q position, row tile, column tile)
    size : int
    source : str
        File named in error messages.

    Raises
    ------
    InputError
        If a fitted point (t2 > t1) is NaN or infinite.
    """
    c2 = np.asarray(block, dtype=np.float32)[0]
    n_phi, n1, n2 = c2.shape
    rows = index[1] * size + np.arange(n1)
    cols = index[2] * size + np.arange(n2)
    fitted = cols[None, :] > rows[:, None]
    bad = ~np.isfinite(c2) & fitted[None]
    if bad.any():
        k, i, j = np.argwhere(bad)[0]
        raise InputError(
            f"{source}: c2 is not finite at q={q:.6g} 1/Å, phi={phi[k]:.4g}°, "
            f"t1={t1[i]:.6g} s, t2={t2[j]:.6g} s"
        )
    padded = np.zeros((n_phi, size, size), np.float32)
    padded[:, :n1, :n2] = np.where(fitted[None], c2, 0.0)
    weight = np.zeros((size, size))
    weight[:n1, :n2] = fitted
    return Tile(
        c2=padded,
        weight=weight,
        t1=_pad_times(t1, size),
        t2=_pad_times(t2, size),
        q=float(q),
        phi=np.asarray(phi, float),
        bin_start=int(bin_start),
        index=tuple(int(v) for v in index),
        extent=(n1, n2),
    )


def _pad_times(t, size):
    out = np.full(size, float(t[-1]))
    out[: t.size] = t
    return out


def plan_tiles(ds: xr.Dataset, size: int = 256) -> TilePlan:
    """Lay the (q, phi, t1, t2) c2 of ``ds`` out as fit tiles of ``size`` frames.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`xpcsfit.open_dataset`: ``c2`` with dims (q, phi, t1, t2) and
        identical t1 and t2 coordinates (s).
    size : int
        Tile edge in frames.

    Returns
    -------
    TilePlan
    """
    c2 = ds["c2"].transpose("q", "phi", "t1", "t2").data
    if not hasattr(c2, "to_delayed"):
        import dask.array as da

        c2 = da.from_array(c2)
    n_q, n_phi, n_t, _ = c2.shape
    c2 = c2.rechunk((1, n_phi, size, size))
    blocks = c2.to_delayed()
    t = np.asarray(ds["t1"].values, float)
    q = np.asarray(ds["q"].values, float)
    phi = np.asarray(ds["phi"].values, float)
    source = ds.attrs.get("source", "input")
    n_tiles = -(-n_t // size)
    loads, indices = [], []
    for iq in range(n_q):
        for bi in range(n_tiles):
            for bj in range(bi, n_tiles):  # tiles wholly below the diagonal are skipped
                index = (iq, bi, bj)
                loads.append(
                    dask.delayed(make_tile, pure=True)(
                        blocks[iq, 0, bi, bj],
                        t[bi * size : (bi + 1) * size],
                        t[bj * size : (bj + 1) * size],
                        q[iq], phi, iq * n_phi, index, size, source,
                        dask_key_name=f"xpcsfit-load-tile-{iq}-{bi}-{bj}-{dask.base.tokenize(blocks[iq, 0, bi, bj].key, size)}",
                    )
                )
                indices.append(index)
    n_points = n_q * n_phi * n_t * (n_t - 1) // 2
    return TilePlan(loads=loads, indices=indices, size=size, n_points=n_points)
