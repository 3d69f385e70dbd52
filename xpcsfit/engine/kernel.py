"""Per-tile sums: residual cost, block-arrow JᵀJ and Jᵀr (DESIGN.md §5).

A point of bin k touches the p physics parameters and only its own bin's contrast_k
and offset_k, so the Jacobian of a tile has block-arrow structure. Instead of a dense
(7 + 2·n_bins)-column Jacobian the kernel forms, per tile:

    A   (p, p)         Σ J_θ J_θᵀ             physics block
    B_k (p, 2)         Σ J_θ [G, 1]           physics × (contrast_k, offset_k)
    C_k (2, 2)         Σ [G, 1]ᵀ[G, 1]        per-bin linear block
    g_θ (p,), g_k (2,) Jᵀr
    cost = ½ Σ r²,     n = number of points

with r = s_k·(offset_k + contrast_k·G − c2), J_θ = s_k·contrast_k ∂G/∂θ and G = g1²,
s_k = √w_k the square root of bin k's weight (w_k = 1/σ_k², the noise model of
:mod:`xpcsfit.leastsq.noise`; 1 when no weights are given), so every sum is the
weighted one. The work per point grows with p² (physics only), not with (p + 2·n_bins)².

Each column of ∂G/∂θ is a per-angle factor times a phi-independent time map
(:func:`~xpcsfit.model.g1_squared_factored`), so A is formed by first summing products
of the factors over the angles and then contracting with the time maps: per (angle,
point) the kernel does a few multiply-adds, per point p² (not n_phi·p²). A tile is
reduced in blocks of whole rows (:data:`ROW_BLOCK_POINTS`) that stay in cache; with
both, a laminar_flow pass costs about 30 ns per (angle, point) on one CPU core, 4×
less than with the full Jacobian formed per angle.

One compiled function per tile shape and mode: tiles are padded to a common shape and
the padding is masked by a zero weight (:func:`compiled_variants` counts them).

The kernels run in float64 (cost differences of 1e-10 relative decide steps): every
entry point here calls :func:`xpcsfit.model.enable_float64` first, so they do in any
process, whatever ran before.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xpcsfit.engine.sums import BlockSums
from xpcsfit.model import c2_model, enable_float64, g1_squared_factored
from xpcsfit.parameters import ParameterLayout

# Cost passes evaluate this many parameter vectors at once (padded with copies), so
# that a batch of trial steps never triggers a new compilation.
COST_BATCH = 4

# Argument signatures (shapes, dtypes, mode) each jitted kernel has been called with in
# this process: one compiled variant each. Kept here because jax.jit has no public count.
_SIGNATURES: set[tuple] = set()


def _run(kernel, *args, mode: str):
    """Call a jitted tile kernel, recording its argument signature (see compiled_variants)."""
    _SIGNATURES.add((kernel.__name__, mode) + tuple((np.shape(a), np.result_type(a).str) for a in args))
    return kernel(*args, mode=mode)


@dataclass(frozen=True)
class TilePlace:
    """Where a tile sits: the fields a :class:`Tile` and its recipe
    (:class:`~xpcsfit.engine.tiles.TileSpec`) share.

    Attributes
    ----------
    q : float
        1/Å.
    phi : ndarray (n_phi,)
        Degrees.
    bin_start : int
        Global index of this tile's first (q, phi) bin; its bins are
        ``bin_start … bin_start + n_phi - 1``.
    index : tuple of int
        (q position, row tile, column tile) in the fit's tile grid.
    start : tuple of int
        (row, column) of the tile's first element in the dataset's (t1, t2) indices.
    """

    q: float
    phi: np.ndarray
    bin_start: int
    index: tuple[int, int, int]
    start: tuple[int, int]


@dataclass(frozen=True)
class Tile(TilePlace):
    """All phi angles of one q over one (t1, t2) time tile, padded to ``size``.

    Attributes
    ----------
    c2 : ndarray (n_phi, size, size), float32
        Measured c2; padding and points not fitted hold 0.
    weight : ndarray (size, size), float64
        1 for fitted points (t2 > t1, inside the selection), 0 elsewhere.
    t1, t2 : ndarray (size,), float64
        Times (s) of the rows and columns; padding repeats the last time.
    extent : tuple of int
        (rows, columns) that are data, not padding.
    q, phi, bin_start, index, start
        See :class:`TilePlace`.
    """

    c2: np.ndarray
    weight: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    extent: tuple[int, int]

    @property
    def n_points(self) -> int:
        return int(self.weight.sum()) * self.c2.shape[0]

    @property
    def nbytes(self) -> int:
        return self.c2.nbytes + self.weight.nbytes


# Tiles are reduced in blocks of whole rows of about this many (t1, t2) pairs, so that
# the model and its factors stay in cache (a whole 256² tile at once ran 3× slower).
ROW_BLOCK_POINTS = 2048


def _sum_over_row_blocks(block_fn, t1, c2, weight):
    """Σ over row blocks of ``block_fn(t1_block, c2_block, weight_block)`` (a pytree).

    t1 (n1,), c2 (n_phi, n1, n2), weight (n1, n2); the blocks are consecutive rows, in a
    fixed order, so the sum does not depend on anything but the tile shape. When the
    rows do not split evenly, the last block is padded with rows of zero weight (which
    add nothing: every sum is weighted).
    """
    n_phi, n1, n2 = c2.shape
    n_blocks = -(-n1 // max(1, min(n1, ROW_BLOCK_POINTS // n2)))
    rows = -(-n1 // n_blocks)
    pad = n_blocks * rows - n1
    if pad:
        t1 = jnp.concatenate([t1, jnp.full(pad, t1[-1])])
        c2 = jnp.pad(c2, ((0, 0), (0, pad), (0, 0)))
        weight = jnp.pad(weight, ((0, pad), (0, 0)))
    c2_blocks = jnp.moveaxis(c2.reshape(n_phi, n_blocks, rows, n2), 1, 0)
    w_blocks = weight.reshape(n_blocks, rows, n2)
    t1_blocks = t1.reshape(n_blocks, rows)
    first = block_fn(t1_blocks[0], c2_blocks[0], w_blocks[0])

    def add_block(total, block):
        return jax.tree.map(jnp.add, total, block_fn(*block)), None

    total, _ = jax.lax.scan(add_block, first, (t1_blocks[1:], c2_blocks[1:], w_blocks[1:]))
    return total


@partial(jax.jit, static_argnames=("mode",))
def _tile_block_sums(theta, contrast, offset, scale, q, L, phi, t1, t2, c2, weight, mode):
    def block(t1_, c2_, w_):
        return _block_sums(theta, contrast, offset, scale, q, L, phi, t1_, t2, c2_, w_, mode)

    return _sum_over_row_blocks(block, t1, c2, weight)


def _contract(a, b):
    """Σ_n a[i, n] b[j, n] -> (i, j)."""
    return jnp.matmul(a, b.T)


def _block_sums(theta, contrast, offset, scale, q, L, phi, t1, t2, c2, weight, mode):
    c2 = c2.astype(jnp.float64)
    n_phi = c2.shape[0]
    # The barrier keeps XLA from fusing the model (sin, exp, log) into each of the
    # reductions below, which recomputed it once per reduction.
    G, groups = jax.lax.optimization_barrier(g1_squared_factored(theta, mode, q, L, phi, t1, t2))
    flat = (n_phi, -1)
    G = jnp.broadcast_to(G, c2.shape).reshape(flat)
    w = weight.reshape(-1)  # 0 or 1, so w² = w
    s = scale[:, None]  # √(bin weight): r and every Jacobian row of bin k carry s_k
    c = contrast[:, None] * s
    r = (offset[:, None] + contrast[:, None] * G - c2.reshape(flat)) * w * s
    # Bin k's Jacobian row for parameter i of group g is F_g[k] · maps_g[i], with
    # F_g = contrast · factor_g. Reduce over the angles first, then contract with the
    # phi-independent time maps: the (n_phi, p, n) Jacobian is never formed.
    F = [jnp.broadcast_to(c * f.reshape(f.shape[0], -1), G.shape) for f, _ in groups]
    maps = [m.reshape(m.shape[0], -1) for _, m in groups]
    wG = w * G * s
    ws = w * s
    A_blocks = []  # A_blocks[g][h]: (m_g, m_h) block of A, from Σ_k F_g F_h over the angles
    for g in range(len(groups)):
        A_blocks.append([])
        for h in range(len(groups)):
            if h < g:
                A_blocks[g].append(A_blocks[h][g].T)
                continue
            W = jnp.sum(F[g] * F[h], axis=0) * w
            A_blocks[g].append(_contract(maps[g] * W, maps[h]))
    A = jnp.block(A_blocks)
    B = jnp.stack([
        jnp.concatenate([_contract(f * wG, m) for f, m in zip(F, maps)], axis=1),
        jnp.concatenate([_contract(f * ws, m) for f, m in zip(F, maps)], axis=1),
    ], axis=-1)  # (n_phi, p, 2)
    g_theta = jnp.concatenate([_contract(jnp.sum(f * r, axis=0)[None], m)[0] for f, m in zip(F, maps)])
    s2 = scale * scale
    sum_wG = jnp.sum(wG, axis=1) * scale
    sum_wGG = jnp.sum(wG * G, axis=1) * scale
    sum_w = jnp.sum(w) * s2
    C = jnp.stack([jnp.stack([sum_wGG, sum_wG], -1), jnp.stack([sum_wG, sum_w], -1)], -2)
    g_bin = jnp.stack([jnp.sum(G * r, axis=1), jnp.sum(r, axis=1)], axis=-1) * scale[:, None]
    rss = jnp.sum(r * r, axis=1)
    return A, B, C, g_theta, g_bin, rss


@partial(jax.jit, static_argnames=("mode",))
def _tile_costs(thetas, contrasts, offsets, scale, q, L, phi, t1, t2, c2, weight, mode):
    def block(t1_, c2_, w_):
        c2_ = c2_.astype(jnp.float64)

        def one(theta, contrast, offset):
            r = (c2_model(theta, contrast, offset, mode, q, L, phi, t1_, t2) - c2_) * w_ * scale[:, None, None]
            return 0.5 * jnp.sum(r * r)

        return jax.vmap(one)(thetas, contrasts, offsets)

    return _sum_over_row_blocks(block, t1, c2, weight)


@partial(jax.jit, static_argnames=("mode",))
def _tile_model(theta, contrast, offset, q, L, phi, t1, t2, mode):
    return c2_model(theta, contrast, offset, mode, q, L, phi, t1, t2)


def _bins(tile: Tile) -> slice:
    """The tile's bins in the global bin arrays."""
    return slice(tile.bin_start, tile.bin_start + tile.c2.shape[0])


def _scale(tile: Tile, bin_weight) -> np.ndarray:
    """√(weight) of the tile's bins, (n_phi,): ones when ``bin_weight`` is None."""
    if bin_weight is None:
        return np.ones(tile.c2.shape[0])
    return np.sqrt(np.asarray(bin_weight, float)[_bins(tile)])


def tile_block_sums(tile: Tile, x: np.ndarray, layout: ParameterLayout, mode: str, L: float,
                    bin_weight=None) -> BlockSums:
    """Block-arrow normal equations of one tile at x, with global bin arrays.

    Parameters
    ----------
    tile : Tile
    x : ndarray (P,)
        Full parameter vector (see :class:`ParameterLayout`).
    layout : ParameterLayout
    mode : {"static", "laminar_flow"}
    L : float
        Gap, Å.
    bin_weight : ndarray (n_bins,), optional
        w_k = 1/σ_k² per bin (weighted least squares); None: 1 for every bin.

    Returns
    -------
    BlockSums with B, C, g_bin of shape (n_bins, …), zero outside this tile's bins; every
    sum weighted (``rss`` is Σ w_k r², ``C[:, 1, 1]`` is w_k·points).
    """
    enable_float64()
    theta, contrast, offset = layout.split(np.asarray(x, float))
    sl = _bins(tile)
    A, B, C, g_theta, g_bin, rss = _run(
        _tile_block_sums, theta, contrast[sl], offset[sl], _scale(tile, bin_weight), tile.q, L, tile.phi,
        tile.t1, tile.t2,
        tile.c2, tile.weight, mode=mode,
    )
    nb, p = layout.n_bins, layout.p
    B_full = np.zeros((nb, p, 2))
    C_full = np.zeros((nb, 2, 2))
    g_full = np.zeros((nb, 2))
    rss_full = np.zeros(nb)
    B_full[sl] = np.asarray(B)
    C_full[sl] = np.asarray(C)
    g_full[sl] = np.asarray(g_bin)
    rss_full[sl] = np.asarray(rss)
    return BlockSums(np.asarray(A), B_full, C_full, np.asarray(g_theta), g_full, rss_full,
                     tile.n_points)


def tile_costs(tile: Tile, xs: np.ndarray, layout: ParameterLayout, mode: str, L: float,
               bin_weight=None) -> np.ndarray:
    """½ Σ w_k r² of one tile for each row of xs (m, P); returns (m,). ``bin_weight`` as
    for :func:`tile_block_sums`."""
    enable_float64()
    xs = np.atleast_2d(np.asarray(xs, float))
    m = xs.shape[0]
    n_batches = -(-m // COST_BATCH)
    padded = np.concatenate([xs, np.repeat(xs[-1:], n_batches * COST_BATCH - m, axis=0)])
    theta, contrast, offset = layout.split(padded)
    sl = _bins(tile)
    scale = _scale(tile, bin_weight)
    out = []
    for b in range(n_batches):
        rows = slice(b * COST_BATCH, (b + 1) * COST_BATCH)
        out.append(np.asarray(_run(
            _tile_costs, theta[rows], contrast[rows, sl], offset[rows, sl], scale, tile.q, L, tile.phi,
            tile.t1, tile.t2, tile.c2, tile.weight, mode=mode,
        )))
    return np.concatenate(out)[:m]


def tile_model(tile: Tile, x: np.ndarray, layout: ParameterLayout, mode: str, L: float) -> np.ndarray:
    """Model c2 on the tile grid, (n_phi, size, size) float64 (padding included)."""
    enable_float64()
    theta, contrast, offset = layout.split(np.asarray(x, float))
    sl = _bins(tile)
    return np.asarray(_run(_tile_model, theta, contrast[sl], offset[sl], tile.q, L, tile.phi,
                           tile.t1, tile.t2, mode=mode))


def compiled_variants() -> int:
    """Compiled variants of the tile kernels in this process, cumulative: one per kernel
    (block sums, costs, model), tile shape and mode; counted from the distinct argument
    signatures the kernels were called with (what jax.jit compiles one variant for)."""
    return len(_SIGNATURES)


def tile_lag_sums(tile: Tile, values=None) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Sums of c2, of c2² and point counts per lag (frame difference) over the fitted points.

    ``values`` (n_phi, size, size), if given, is summed instead of c2 (e.g. residuals).

    Returns
    -------
    lag0 : int
        Lag (in frames) of the first entry.
    sums, squares : ndarray (n_phi, n_lags)
    counts : ndarray (n_lags,)
    """
    size = tile.weight.shape[0]
    i = np.arange(size)[:, None]
    j = np.arange(size)[None, :]
    row0, col0 = tile.start
    lag = (col0 + j) - (row0 + i)
    mask = tile.weight > 0
    lag0 = int(lag[mask].min()) if mask.any() else 0
    idx = (lag - lag0)[mask]
    n_lags = int(idx.max()) + 1 if mask.any() else 0
    counts = np.bincount(idx, minlength=n_lags).astype(float)
    values = [c[mask].astype(float) for c in (tile.c2 if values is None else values)]
    sums = np.stack([np.bincount(idx, weights=v, minlength=n_lags) for v in values])
    squares = np.stack([np.bincount(idx, weights=v * v, minlength=n_lags) for v in values])
    return lag0, sums, counts, squares


def add_lag_sums(tile_sums, bin_starts, n_bins: int, n_phi: int,
                 n_lags: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add per-tile lag sums (:func:`tile_lag_sums`, one per tile) into per-bin arrays.

    Parameters
    ----------
    tile_sums : list of (lag0, sums (n_phi, n), counts (n,), squares (n_phi, n))
    bin_starts : list of int
        Each tile's first bin, in the same order.
    n_bins, n_phi, n_lags : int

    Returns
    -------
    sums, counts, squares : ndarray (n_bins, n_lags)
    """
    sums = np.zeros((n_bins, n_lags))
    counts = np.zeros((n_bins, n_lags))
    squares = np.zeros((n_bins, n_lags))
    for (lag0, s, c, s2), b0 in zip(tile_sums, bin_starts):
        n = c.size
        sums[b0 : b0 + n_phi, lag0 : lag0 + n] += s
        counts[b0 : b0 + n_phi, lag0 : lag0 + n] += c
        squares[b0 : b0 + n_phi, lag0 : lag0 + n] += s2
    return sums, counts, squares
