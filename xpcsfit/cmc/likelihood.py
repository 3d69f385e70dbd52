"""The likelihood of one CMC shard, with contrast and offset integrated out.

    c2 = offset_k + contrast_k·G(θ) + e with e ~ Normal(0, var_k), one var_k per (q, phi)
    bin, fixed: the least-squares residual variance times an inflation factor for the
    correlated noise (see :mod:`xpcsfit.noise`). contrast_k and offset_k enter
    linearly and are integrated out analytically under a flat prior; per bin this leaves

        log L_k(θ) = -RSS_k(θ) / (2 var_k) - ½ log det M_k(θ) + const,

    RSS_k the residual sum of squares at the best contrast/offset for this θ and M_k
    the 2×2 Gram matrix of [G, 1]. Marginalising per shard gives each shard its own
    contrast/offset; shards interleaved over the whole map
    (:func:`xpcsfit.cmc.shard.shard_of`) have nearly the same θ-information about them,
    so the loss against shared values is second order (the consensus test measures it:
    sds within a few % of full-data NUTS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpcsfit.model import g1_squared_pairs


@dataclass
class ShardData:
    """The points one shard conditions on, grouped by q.

    Attributes
    ----------
    groups : list of dict
        Per q: ``q`` (1/Å), ``phi`` (n_phi,) deg, ``t1``, ``t2`` (n,) s with t2 > t1,
        ``yc`` (n_phi, n) c2 minus its per-bin mean, ``bins`` (n_phi,) global bin index.
    n : ndarray (n_bins,)
        Points per bin.
    syy : ndarray (n_bins,)
        Σ yc² per bin.
    """

    groups: list
    n: np.ndarray
    syy: np.ndarray

    @property
    def n_points(self) -> int:
        return int(self.n.sum())


def log_likelihood(theta, data: ShardData, var: np.ndarray, mode: str, L: float):
    """Σ over bins of the contrast/offset-marginal Gaussian log likelihood (JAX).

    Parameters
    ----------
    theta : array (p,)
        Physics parameters in ``xpcsfit.parameters.MODES[mode]`` order.
    data : ShardData
    var : ndarray (n_bins,)
        Noise variance per bin (c2 units²).
    mode : {"static", "laminar_flow"}
    L : float
        Gap, Å.

    Returns
    -------
    scalar: the log likelihood up to a constant.
    """
    import jax.numpy as jnp

    total = 0.0
    for g in data.groups:
        G = jnp.broadcast_to(g1_squared_pairs(theta, mode, g["q"], L, g["phi"], g["t1"], g["t2"]),
                             g["yc"].shape)
        b = g["bins"]
        n = data.n[b]
        sg = G.sum(axis=1)
        sgg = jnp.maximum((G * G).sum(axis=1) - sg * sg / n, 1e-300)
        syg = (g["yc"] * G).sum(axis=1)
        rss = data.syy[b] - syg * syg / sgg
        total = total + jnp.sum(-0.5 * rss / var[b] - 0.5 * jnp.log(sgg))
    return total
