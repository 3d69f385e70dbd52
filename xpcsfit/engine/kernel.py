"""Per-tile sums: residual cost, block-arrow JᵀJ and Jᵀr (DESIGN.md §5).

A point of bin k touches the p physics parameters and only its own bin's contrast_k
and offset_k, so the Jacobian of a tile has block-arrow structure. Instead of a dense
(7 + 2·n_bins)-column Jacobian the kernel forms, per tile:

    A   (p, p)         Σ J_θ J_θᵀ             physics block
    B_k (p, 2)         Σ J_θ [G, 1]           physics × (contrast_k, offset_k)
    C_k (2, 2)         Σ [G, 1]ᵀ[G, 1]        per-bin linear block
    g_θ (p,), g_k (2,) Jᵀr
    cost = ½ Σ r²,     n = number of points

with r = offset_k + contrast_k·G − c2, J_θ = contrast_k ∂G/∂θ and G = g1². The work per
point grows with p² (physics only), not with (p + 2·n_bins)².

Each column of ∂G/∂θ is a per-angle factor times a phi-independent time map
(:func:`~xpcsfit.model.g1_squared_factored`), so A is formed by first summing products
of the factors over the angles and then contracting with the time maps: per (angle,
point) the kernel does a few multiply-adds, per point p² (not n_phi·p²). A tile is
reduced in blocks of whole rows (:data:`ROW_BLOCK_POINTS`) that stay in cache; with
both, a laminar_flow pass costs about 30 ns per (angle, point) on one CPU core, 4×
less than with the full Jacobian formed per angle.

One compiled function per tile shape and mode: tiles are padded to a common shape and
the padding is masked by a zero weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xpcsfit import model as _model  # noqa: F401  (sets jax_enable_x64 before any array is made)
from xpcsfit.model import g1_squared, g1_squared_factored

# Cost passes evaluate this many parameter vectors at once (padded with copies), so
# that a batch of trial steps never triggers a new compilation.
COST_BATCH = 4


@dataclass(frozen=True)
class Tile:
    """All phi angles of one q over one (t1, t2) time tile, padded to ``size``.

    Attributes
    ----------
    c2 : ndarray (n_phi, size, size), float32
        Measured c2; padding and points not fitted hold 0.
    weight : ndarray (size, size), float64
        1 for fitted points (t2 > t1, inside the selection), 0 elsewhere.
    t1, t2 : ndarray (size,), float64
        Times (s) of the rows and columns; padding repeats the last time.
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
    extent : tuple of int
        (rows, columns) that are data, not padding.
    """

    c2: np.ndarray
    weight: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    q: float
    phi: np.ndarray
    bin_start: int
    index: tuple[int, int, int]
    start: tuple[int, int]
    extent: tuple[int, int]

    @property
    def n_points(self) -> int:
        return int(self.weight.sum()) * self.c2.shape[0]

    @property
    def nbytes(self) -> int:
        return self.c2.nbytes + self.weight.nbytes


@dataclass
class BlockSums:
    """Reduced block-arrow normal equations of a set of tiles.

    Attributes
    ----------
    A : (p, p)        B : (n_bins, p, 2)      C : (n_bins, 2, 2)
    g_theta : (p,)    g_bin : (n_bins, 2)
    rss : (n_bins,)   Σ r² per bin (C[:, 1, 1] is the bin's number of points)
    n : int           number of points
    """

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    g_theta: np.ndarray
    g_bin: np.ndarray
    rss: np.ndarray
    n: int

    @property
    def cost(self) -> float:
        """½ Σ r² over all bins."""
        return 0.5 * float(self.rss.sum())

    def residual_rms(self) -> np.ndarray:
        """Root mean square residual per bin, (n_bins,); NaN for a bin without points."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.rss / self.C[:, 1, 1])

    def __add__(self, other: "BlockSums") -> "BlockSums":
        return BlockSums(
            self.A + other.A,
            self.B + other.B,
            self.C + other.C,
            self.g_theta + other.g_theta,
            self.g_bin + other.g_bin,
            self.rss + other.rss,
            self.n + other.n,
        )

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """Assemble JᵀJ (P, P) and Jᵀr (P,) over x = [θ, contrast_0.., offset_0..].

        P = p + 2·n_bins. The layout matches :class:`ParameterLayout`.
        """
        p = self.A.shape[0]
        nb = self.C.shape[0]
        P = p + 2 * nb
        jtj = np.zeros((P, P))
        jtj[:p, :p] = self.A
        ic = p + np.arange(nb)
        io = p + nb + np.arange(nb)
        jtj[:p, ic] = self.B[:, :, 0].T
        jtj[:p, io] = self.B[:, :, 1].T
        jtj[ic, :p] = self.B[:, :, 0]
        jtj[io, :p] = self.B[:, :, 1]
        jtj[ic, ic] = self.C[:, 0, 0]
        jtj[ic, io] = self.C[:, 0, 1]
        jtj[io, ic] = self.C[:, 1, 0]
        jtj[io, io] = self.C[:, 1, 1]
        jtr = np.concatenate([self.g_theta, self.g_bin[:, 0], self.g_bin[:, 1]])
        return jtj, jtr


@dataclass(frozen=True)
class ParameterLayout:
    """Where each parameter sits in the solver's vector x.

    x = [θ (p physics parameters), contrast of every bin, offset of every bin], bins
    ordered (q, phi) row-major: bin = q_position·n_phi + phi_position.
    """

    physics: tuple[str, ...]
    n_q: int
    n_phi: int

    @property
    def p(self) -> int:
        return len(self.physics)

    @property
    def n_bins(self) -> int:
        return self.n_q * self.n_phi

    @property
    def size(self) -> int:
        return self.p + 2 * self.n_bins

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(θ (p,), contrast (n_bins,), offset (n_bins,)) views of x (..., P)."""
        p, nb = self.p, self.n_bins
        return x[..., :p], x[..., p : p + nb], x[..., p + nb :]

    def join(self, theta, contrast, offset) -> np.ndarray:
        return np.concatenate([np.asarray(theta, float), np.ravel(contrast), np.ravel(offset)])

    def names(self) -> list[str]:
        return (
            list(self.physics)
            + [f"contrast[{b}]" for b in range(self.n_bins)]
            + [f"offset[{b}]" for b in range(self.n_bins)]
        )


def _residual_parts(theta, contrast, offset, q, L, phi, t1, t2, c2, weight, mode):
    G = g1_squared(theta, mode, q, L, phi, t1, t2)
    r = (offset[:, None, None] + contrast[:, None, None] * G - c2) * weight
    return G, r


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
def _tile_block_sums(theta, contrast, offset, q, L, phi, t1, t2, c2, weight, mode):
    def block(t1_, c2_, w_):
        return _block_sums(theta, contrast, offset, q, L, phi, t1_, t2, c2_, w_, mode)

    return _sum_over_row_blocks(block, t1, c2, weight)


def _contract(a, b):
    """Σ_n a[i, n] b[j, n] -> (i, j)."""
    return jnp.matmul(a, b.T)


def _block_sums(theta, contrast, offset, q, L, phi, t1, t2, c2, weight, mode):
    c2 = c2.astype(jnp.float64)
    n_phi = c2.shape[0]
    # The barrier keeps XLA from fusing the model (sin, exp, log) into each of the
    # reductions below, which recomputed it once per reduction.
    G, groups = jax.lax.optimization_barrier(g1_squared_factored(theta, mode, q, L, phi, t1, t2))
    flat = (n_phi, -1)
    G = jnp.broadcast_to(G, c2.shape).reshape(flat)
    w = weight.reshape(-1)  # 0 or 1, so w² = w
    c = contrast[:, None]
    r = (offset[:, None] + c * G - c2.reshape(flat)) * w
    # Bin k's Jacobian row for parameter i of group g is F_g[k] · maps_g[i], with
    # F_g = contrast · factor_g. Reduce over the angles first, then contract with the
    # phi-independent time maps: the (n_phi, p, n) Jacobian is never formed.
    F = [jnp.broadcast_to(c * f.reshape(f.shape[0], -1), G.shape) for f, _ in groups]
    maps = [m.reshape(m.shape[0], -1) for _, m in groups]
    wG = w * G
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
        jnp.concatenate([_contract(f * w, m) for f, m in zip(F, maps)], axis=1),
    ], axis=-1)  # (n_phi, p, 2)
    g_theta = jnp.concatenate([_contract(jnp.sum(f * r, axis=0)[None], m)[0] for f, m in zip(F, maps)])
    sum_wG = jnp.sum(wG, axis=1)
    sum_wGG = jnp.sum(wG * G, axis=1)
    sum_w = jnp.broadcast_to(jnp.sum(w), (n_phi,))
    C = jnp.stack([jnp.stack([sum_wGG, sum_wG], -1), jnp.stack([sum_wG, sum_w], -1)], -2)
    g_bin = jnp.stack([jnp.sum(G * r, axis=1), jnp.sum(r, axis=1)], axis=-1)
    rss = jnp.sum(r * r, axis=1)
    return A, B, C, g_theta, g_bin, rss


@partial(jax.jit, static_argnames=("mode",))
def _tile_costs(thetas, contrasts, offsets, q, L, phi, t1, t2, c2, weight, mode):
    def block(t1_, c2_, w_):
        c2_ = c2_.astype(jnp.float64)

        def one(theta, contrast, offset):
            _, r = _residual_parts(theta, contrast, offset, q, L, phi, t1_, t2, c2_, w_, mode)
            return 0.5 * jnp.sum(r * r)

        return jax.vmap(one)(thetas, contrasts, offsets)

    return _sum_over_row_blocks(block, t1, c2, weight)


@partial(jax.jit, static_argnames=("mode",))
def _tile_model(theta, contrast, offset, q, L, phi, t1, t2, mode):
    G = g1_squared(theta, mode, q, L, phi, t1, t2)
    return offset[:, None, None] + contrast[:, None, None] * G


def _tile_args(tile: Tile):
    return (tile.q, tile.phi, tile.t1, tile.t2)


def tile_block_sums(tile: Tile, x: np.ndarray, layout: ParameterLayout, mode: str, L: float) -> BlockSums:
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

    Returns
    -------
    BlockSums with B, C, g_bin of shape (n_bins, …), zero outside this tile's bins.
    """
    theta, contrast, offset = layout.split(np.asarray(x, float))
    n_phi = tile.c2.shape[0]
    sl = slice(tile.bin_start, tile.bin_start + n_phi)
    A, B, C, g_theta, g_bin, rss = _tile_block_sums(
        theta, contrast[sl], offset[sl], tile.q, L, tile.phi, tile.t1, tile.t2,
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


def tile_costs(tile: Tile, xs: np.ndarray, layout: ParameterLayout, mode: str, L: float) -> np.ndarray:
    """½ Σ r² of one tile for each row of xs (m, P); returns (m,)."""
    xs = np.atleast_2d(np.asarray(xs, float))
    m = xs.shape[0]
    n_batches = -(-m // COST_BATCH)
    padded = np.concatenate([xs, np.repeat(xs[-1:], n_batches * COST_BATCH - m, axis=0)])
    theta, contrast, offset = layout.split(padded)
    n_phi = tile.c2.shape[0]
    sl = slice(tile.bin_start, tile.bin_start + n_phi)
    out = []
    for b in range(n_batches):
        rows = slice(b * COST_BATCH, (b + 1) * COST_BATCH)
        out.append(np.asarray(_tile_costs(
            theta[rows], contrast[rows, sl], offset[rows, sl], tile.q, L, tile.phi,
            tile.t1, tile.t2, tile.c2, tile.weight, mode=mode,
        )))
    return np.concatenate(out)[:m]


def tile_model(tile: Tile, x: np.ndarray, layout: ParameterLayout, mode: str, L: float) -> np.ndarray:
    """Model c2 on the tile grid, (n_phi, size, size) float64 (padding included)."""
    theta, contrast, offset = layout.split(np.asarray(x, float))
    n_phi = tile.c2.shape[0]
    sl = slice(tile.bin_start, tile.bin_start + n_phi)
    return np.asarray(_tile_model(theta, contrast[sl], offset[sl], tile.q, L, tile.phi,
                                  tile.t1, tile.t2, mode=mode))


def tile_lag_sums(tile: Tile) -> tuple[int, np.ndarray, np.ndarray]:
    """Sums of c2 and point counts per lag (frame difference) over the fitted points.

    Returns
    -------
    lag0 : int
        Lag (in frames) of the first entry.
    sums : ndarray (n_phi, n_lags)
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
    sums = np.stack([np.bincount(idx, weights=c[mask].astype(float), minlength=n_lags)
                     for c in tile.c2])
    return lag0, sums, counts
