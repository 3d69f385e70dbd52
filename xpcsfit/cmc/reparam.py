"""A shard's NUTS coordinates z: each transport curve's (slope, value) non-centred on the
scale the shard's data give it at every amplitude position u.

Why. In the coordinates w of :mod:`xpcsfit.cmc.coordinates` the data determine the slope
s and value y of J(t) (and of gamma_dot(t)) whatever the amplitude is, but not equally:
where the amplitude A is small (u low) the curvature s²/A of the power law is large and
the data pin (s, y) tightly, and where A is large they leave them the width of the
window's information. When alpha ≈ 0 and beta ≈ 0 (D0 / D_offset and the two shear
terms not separately determined) u is set by its prior alone and the chains travel the
whole range: on flow_small the conditional sd of s changes 6-fold and more along u (a
funnel), NUTS's one step size fits one end only, and shards end with divergences,
tree depth 7 and bulk ESS of tens.

What. Per power-law block, with u kept as it is,

    (s, y) = c + C(u) ζ,        C(u) = Σ_i k_i(u) C_i,   k_i = softmax_i(-(u - u_i)² / 2h²)

C_i the Cholesky factor of the conditional covariance of (s, y) given u = u_i (the
inverse of the 2×2 block of the shard target's negative Hessian at (u_i, c)) on a grid
u_i spanning the tempered prior of u, and c the least-squares (s, y). C(u) is a smooth
(C∞) average of lower-triangular factors with positive diagonals, so the map is one to
one for every u, and ζ has about unit scale wherever the chains are. The density of z
is the shard target at w(z) times |det ∂w/∂z| = Π_blocks C11(u)·C22(u) (exact: the
sampled posterior of w, and so of θ, J(t) and gamma_dot(t), is unchanged; only the
geometry NUTS sees is). Grid points where the Hessian is not positive definite or the
target not finite are left out; the kernel average of the others covers them.

The map depends on the shard's own data; it is only how NUTS walks. Draws come back in
w, where all shards are combined (the prior is tempered there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID_HALF_WIDTH_SD = 2.0  # the u grid spans ± this many sds of the tempered prior of u
GRID_POINTS = 9


@dataclass(frozen=True)
class BlockScale:
    """The non-centring of one power-law block (columns ``u``, ``s``, ``y`` of w).

    Attributes
    ----------
    cols : tuple of int
        (u, s, y) column indices in w.
    centre : ndarray (2,)
        c, the (s, y) the map is centred on.
    grid : ndarray (m,)
        u_i, the grid points kept (m >= 1).
    chol : ndarray (m, 2, 2)
        C_i, lower triangular, positive diagonal.
    bandwidth : float
        h, in units of u.
    """

    cols: tuple
    centre: np.ndarray
    grid: np.ndarray
    chol: np.ndarray
    bandwidth: float

    def factor(self, u):
        """C(u) (…, 2, 2); JAX."""
        import jax
        import jax.numpy as jnp

        k = jax.nn.softmax(-0.5 * ((u[..., None] - self.grid) / self.bandwidth) ** 2, axis=-1)
        return jnp.einsum("...i,ijk->...jk", k, self.chol)


@dataclass(frozen=True)
class ShardMap:
    """w = T(z) for one shard: the blocks' non-centring; other coordinates as they are."""

    blocks: tuple

    def to_w(self, z):
        """(w, log |det ∂w/∂z|) of z (p,); JAX."""
        import jax.numpy as jnp

        w = z
        log_det = 0.0
        for b in self.blocks:
            iu, i_s, i_y = b.cols
            C = b.factor(z[iu])
            zeta = jnp.stack([z[i_s], z[i_y]])
            sy = jnp.asarray(b.centre) + C @ zeta
            w = w.at[i_s].set(sy[0]).at[i_y].set(sy[1])
            log_det = log_det + jnp.log(C[0, 0]) + jnp.log(C[1, 1])
        return w, log_det

    def to_z(self, w) -> np.ndarray:
        """z of w (p,) (NumPy): the inverse of :meth:`to_w`."""
        import jax.numpy as jnp

        z = np.array(w, float)
        for b in self.blocks:
            iu, i_s, i_y = b.cols
            C = np.asarray(b.factor(jnp.asarray(z[iu])))
            z[[i_s, i_y]] = np.linalg.solve(C, np.array([w[i_s], w[i_y]]) - b.centre)
        return z


def identity_map() -> ShardMap:
    return ShardMap(blocks=())


def fit_shard_map(log_target, w_start, block_cols, u_sd: float) -> ShardMap:
    """The map of a shard from its log target's Hessians on a grid of u.

    Parameters
    ----------
    log_target : callable
        w (p,) -> scalar, JAX (the shard's prior^(1/K) × likelihood).
    w_start : ndarray (p,)
        The least-squares point in w (the map's centre c).
    block_cols : list of (int, int, int)
        (u, s, y) columns of every power-law block.
    u_sd : float
        Sd of the tempered prior of u (the grid spans ± GRID_HALF_WIDTH_SD of it).

    Returns
    -------
    ShardMap (the identity for a block where no grid point has a positive-definite
    conditional Hessian).
    """
    import jax
    import jax.numpy as jnp

    w0 = np.asarray(w_start, float)
    grid = np.linspace(-GRID_HALF_WIDTH_SD, GRID_HALF_WIDTH_SD, GRID_POINTS) * u_sd
    spacing = grid[1] - grid[0]

    blocks = []
    for iu, i_s, i_y in block_cols:
        def sub(sy, u, iu=iu, i_s=i_s, i_y=i_y):
            w = jnp.asarray(w0).at[iu].set(u).at[i_s].set(sy[0]).at[i_y].set(sy[1])
            return log_target(w)

        # The 2×2 conditional Hessian only: two Hessian-vector products per grid point.
        hess = jax.jit(jax.vmap(jax.hessian(sub), in_axes=(None, 0)))
        value = jax.jit(jax.vmap(sub, in_axes=(None, 0)))
        c = w0[[i_s, i_y]]
        H = -np.asarray(hess(jnp.asarray(c), jnp.asarray(grid)))
        lp = np.asarray(value(jnp.asarray(c), jnp.asarray(grid)))
        keep, chols = [], []
        for i in range(grid.size):
            h = 0.5 * (H[i] + H[i].T)
            if not (np.isfinite(lp[i]) and np.all(np.isfinite(h))):
                continue
            try:
                L = np.linalg.cholesky(np.linalg.inv(h))
            except np.linalg.LinAlgError:
                continue  # not positive definite here: the neighbours cover it
            keep.append(grid[i])
            chols.append(L)
        if keep:
            blocks.append(BlockScale(cols=(iu, i_s, i_y), centre=c, grid=np.asarray(keep),
                                     chol=np.asarray(chols), bandwidth=float(spacing)))
    return ShardMap(blocks=tuple(blocks))
