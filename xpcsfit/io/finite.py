"""The one NaN/Inf check of c2: every fitted point (t2 > t1) must be finite.

Called by :func:`xpcsfit.io.dataset.open_dataset` on a whole (dask) selection, and by
:func:`xpcsfit.engine.tiles.make_tile` on each tile as a worker loads it.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from xpcsfit.errors import InputError


def require_finite(c2, rows, cols, *, source: str, q, phi) -> None:
    """Raise InputError if ``c2`` holds a NaN or an infinity at a fitted point.

    A point is fitted when its column comes after its row (t2 > t1); values on and
    below the diagonal are not looked at.

    Parameters
    ----------
    c2 : ndarray or dask.array.Array, shape (n_q, n_phi, n1, n2) or (n_phi, n1, n2)
        Two-time values as loaded, before any padding. A dask array is reduced block by
        block on the threaded scheduler of this process (nothing is held whole).
    rows, cols : array_like, shapes (n1,), (n2,)
        Frame indices (or times) of the rows and columns, with one origin; only their
        order is used.
    source : str
        File or store, for the message.
    q : float or array_like, shape (n_q,)
        q of each q slab, 1/Å (one value for a 3-D ``c2``).
    phi : array_like, shape (n_phi,)
        phi of each angle, degrees.

    Raises
    ------
    InputError
        ``"{source}: non-finite c2 values above the diagonal at q=… 1/Å, phi=… deg"``,
        naming the first bad (q, phi) bin in index order.
    """
    rows, cols = np.asarray(rows), np.asarray(cols)
    if c2.ndim == 3:
        c2 = c2[None]
    if isinstance(c2, da.Array):
        bad = c2.map_blocks(
            _bad_block, rows=rows, cols=cols,
            chunks=(c2.chunks[0], c2.chunks[1], (1,) * len(c2.chunks[2]), (1,) * len(c2.chunks[3])),
            dtype=bool,
        ).any(axis=(2, 3))
        # Read here, not on a cluster: a check before any fit work, and cheap at the
        # sizes open_dataset checks eagerly.
        bad = np.asarray(bad.compute(scheduler="threads"))
    else:
        bad = _bad(np.asarray(c2), rows, cols, keepdims=False)
    hits = np.argwhere(bad)
    if hits.size:
        iq, ip = hits[0]
        qv = np.atleast_1d(np.asarray(q, dtype=np.float64))[iq]
        pv = np.asarray(phi, dtype=np.float64)[ip]
        raise InputError(
            f"{source}: non-finite c2 values above the diagonal at q={qv:.6g} 1/Å, phi={pv:.6g} deg"
        )


def _bad(block: np.ndarray, rows: np.ndarray, cols: np.ndarray, keepdims: bool) -> np.ndarray:
    """Per (q, phi): does ``block`` (n_q, n_phi, n1, n2) hold a non-finite fitted point?"""
    fitted = cols[None, :] > rows[:, None]
    return (~np.isfinite(block) & fitted).any(axis=(2, 3), keepdims=keepdims)


def _bad_block(block: np.ndarray, block_info=None, *, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[0]["array-location"][2:]
    return _bad(block, rows[r0:r1], cols[c0:c1], keepdims=True)
