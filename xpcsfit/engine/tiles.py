"""From a c2 Dataset to fit tiles: the grid, the skipped lower tiles, the padding.

A tile holds all phi angles of one q over one (t1, t2) time tile (DESIGN.md §4). The
grid is aligned to absolute frame numbers (edges at multiples of ``size``), so the tiles
of a fit coincide with the chunks of a store ingested with the same tile size whatever
frame range is selected: a tile then reads exactly one chunk. Tiles wholly below the
diagonal hold no fitted point and are skipped; edge tiles are padded to ``size`` so that
every tile has one shape (one compiled kernel) and the padding is masked by a zero weight.

A :class:`TileSpec` is the small, picklable recipe of one tile (a lazy dask slice of the
source plus its coordinates); ``spec.load()`` reads the data and builds the
:class:`~xpcsfit.engine.kernel.Tile`. Evaluators either load every tile once and hold it, or
load it afresh in every pass (streaming, for data larger than the workers' memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from xpcsfit.engine.kernel import Tile, TilePlace
from xpcsfit.io.finite import require_finite

# Frames per tile edge when neither the config nor a store gives one: 128² × n_phi
# points keep one tile's kernel workspace in the tens of MiB at 8-24 phi.
DEFAULT_TILE = 128


@dataclass(frozen=True)
class TileSpec(TilePlace):
    """How to load one tile.

    Attributes
    ----------
    block : dask.array.Array (1, n_phi, n1, n2)
        Lazy slice of c2 (NaN below the diagonal).
    t1, t2 : ndarray (n1,), (n2,)
        Times of its rows and columns, s.
    size : int
        Tile edge (frames) it is padded to.
    source : str
        The input, for error messages.
    q, phi, bin_start, index, start
        See :class:`~xpcsfit.engine.kernel.TilePlace`.
    """

    block: object
    t1: np.ndarray
    t2: np.ndarray
    size: int
    source: str

    @property
    def nbytes(self) -> int:
        """Memory of the loaded, padded tile."""
        return self.phi.size * self.size * self.size * 4 + self.size * self.size * 8

    def load(self) -> Tile:
        """Read the block (synchronously, in this process) and build the Tile.

        Raises
        ------
        InputError
            If a fitted point (t2 > t1) is NaN or infinite.
        """
        block = np.asarray(self.block.compute(scheduler="synchronous"), dtype=np.float32)
        return make_tile(block[0], self)


def load_tiles(ds: xr.Dataset, specs: list[TileSpec]) -> list[Tile]:
    """Load the tiles ``specs`` of ``ds`` (from :func:`plan_tiles`) in this process.

    The tiles ``spec.load()`` gives, one q at a time from one read of its whole map
    (n_phi, T, T) float32, held while its tiles are made: reading tile by tile
    decompressed each stored HDF5 chunk once for every tile it overlaps and built a
    dask graph per tile (on B1, 0.1 s against 0.03 s).

    Raises
    ------
    InputError
        If a fitted point (t2 > t1) is NaN or infinite.
    """
    c2 = ds["c2"].transpose("q", "phi", "t1", "t2").data
    tiles = []
    for iq in range(ds.sizes["q"]):
        block = c2[iq]
        block = np.asarray(block.compute(scheduler="synchronous") if hasattr(block, "compute") else block,
                           dtype=np.float32)
        for spec in specs:
            if spec.index[0] == iq:
                (r0, c0), n1, n2 = spec.start, spec.t1.size, spec.t2.size
                tiles.append(make_tile(block[:, r0 : r0 + n1, c0 : c0 + n2], spec))
        del block
    return tiles


def make_tile(c2: np.ndarray, spec: TileSpec) -> Tile:
    """Pad and mask one loaded block (n_phi, n1, n2) into a :class:`Tile`."""
    n_phi, n1, n2 = c2.shape
    rows = spec.start[0] + np.arange(n1)
    cols = spec.start[1] + np.arange(n2)
    require_finite(c2, rows, cols, source=spec.source, q=spec.q, phi=spec.phi)
    fitted = cols[None, :] > rows[:, None]
    size = spec.size
    padded = np.zeros((n_phi, size, size), np.float32)
    padded[:, :n1, :n2] = np.where(fitted[None], c2, 0.0)
    weight = np.zeros((size, size))
    weight[:n1, :n2] = fitted
    return Tile(
        c2=padded,
        weight=weight,
        t1=_pad_times(spec.t1, size),
        t2=_pad_times(spec.t2, size),
        q=float(spec.q),
        phi=np.asarray(spec.phi, float),
        bin_start=int(spec.bin_start),
        index=spec.index,
        start=spec.start,
        extent=(n1, n2),
    )


def _pad_times(t, size):
    out = np.full(size, float(t[-1]))
    out[: t.size] = t
    return out


def tile_edges(first_frame: int, n_t: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) dataset indices of the tiles along one time axis.

    Edges sit at absolute frame numbers that are multiples of ``size``; dataset index 0
    is frame ``first_frame``.
    """
    lead = first_frame % size
    edges = [0] + list(range(size - lead, n_t, size)) + [n_t]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def plan_tiles(ds: xr.Dataset, size: int) -> list[TileSpec]:
    """Lay the (q, phi, t1, t2) c2 of ``ds`` out as fit tiles of ``size`` frames.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`xpcsfit.open_dataset`: ``c2`` (q, phi, t1, t2), identical t1 and t2
        coordinates (s), attribute ``frames`` [A, B].
    size : int
        Tile edge in frames.

    Returns
    -------
    list of TileSpec, q-major, then row tile, then column tile (≥ row tile).
    """
    c2 = ds["c2"].transpose("q", "phi", "t1", "t2").data
    if not hasattr(c2, "compute"):
        import dask.array as da

        c2 = da.from_array(c2)
    n_q, n_phi, n_t, _ = c2.shape
    t = np.asarray(ds["t1"].values, float)
    q = np.asarray(ds["q"].values, float)
    phi = np.asarray(ds["phi"].values, float)
    source = ds.attrs.get("source", "input")
    edges = tile_edges(int(ds.attrs.get("frames", [0])[0]), n_t, size)
    specs = []
    for iq in range(n_q):
        for bi, (r0, r1) in enumerate(edges):
            for bj in range(bi, len(edges)):  # tiles wholly below the diagonal are skipped
                c0, c1 = edges[bj]
                specs.append(TileSpec(
                    block=c2[iq : iq + 1, :, r0:r1, c0:c1], t1=t[r0:r1], t2=t[c0:c1],
                    q=float(q[iq]), phi=phi, bin_start=iq * n_phi, index=(iq, bi, bj),
                    start=(r0, c0), size=size, source=source,
                ))
    return specs


def count_points(ds: xr.Dataset) -> int:
    """Fitted points (t2 > t1) over all bins of ``ds``."""
    n_t = ds.sizes["t1"]
    return ds.sizes["q"] * ds.sizes["phi"] * n_t * (n_t - 1) // 2
