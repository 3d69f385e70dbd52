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

import jax
import numpy as np

from xpcsfit.model import g1_squared_pairs

_ARRAYS = ("t1", "t2", "yc", "mask")  # per group, traced under jit; q, phi, bins are static


@jax.tree_util.register_pytree_node_class
@dataclass
class ShardData:
    """The points one shard conditions on, grouped by q; a JAX pytree (its arrays are
    traced under ``jax.jit``, the q, phi and bins of each group are static).

    Attributes
    ----------
    groups : list of dict
        Per q: ``q`` (1/Å), ``phi`` (n_phi,) deg, ``bins`` (n_phi,) global bin index,
        ``t1``, ``t2`` (n,) s with t2 > t1, ``yc`` (n_phi, n) c2 minus its per-bin mean,
        ``mask`` (n,) 1 for a point, 0 for padding (:func:`pad_to_common_shapes`;
        padded points repeat a real pair's times and have yc = 0).
    n : ndarray (n_bins,)
        Points per bin (padding not counted).
    syy : ndarray (n_bins,)
        Σ yc² per bin.
    """

    groups: list
    n: np.ndarray
    syy: np.ndarray

    @property
    def n_points(self) -> int:
        return int(np.sum(self.n))

    def tree_flatten(self):
        children = ([tuple(g[k] for k in _ARRAYS) for g in self.groups], self.n, self.syy)
        static = tuple((float(g["q"]), tuple(np.asarray(g["phi"], float)), tuple(np.asarray(g["bins"], int)))
                       for g in self.groups)
        return children, static

    @classmethod
    def tree_unflatten(cls, static, children):
        arrays, n, syy = children
        groups = [dict(zip(_ARRAYS, a), q=q, phi=np.asarray(phi), bins=np.asarray(bins))
                  for (q, phi, bins), a in zip(static, arrays)]
        return cls(groups=groups, n=n, syy=syy)


def pad_to_common_shapes(shards: list[ShardData]) -> list[ShardData]:
    """The shards with each q group padded to the longest of all shards (masked points),
    so that every shard of a run has the same array shapes and a worker compiles its
    NUTS sampler once for all the shards it runs."""
    longest = [max(s.groups[k]["t1"].size for s in shards) for k in range(len(shards[0].groups))]
    out = []
    for s in shards:
        groups = []
        for g, size in zip(s.groups, longest):
            pad = size - g["t1"].size
            groups.append(dict(g, t1=np.pad(g["t1"], (0, pad), mode="edge"),
                               t2=np.pad(g["t2"], (0, pad), mode="edge"),
                               yc=np.pad(g["yc"], ((0, 0), (0, pad))), mask=np.pad(g["mask"], (0, pad))))
        out.append(ShardData(groups=groups, n=s.n, syy=s.syy))
    return out


def log_likelihood(theta, data: ShardData, var, mode: str, L: float):
    """Σ over bins of the contrast/offset-marginal Gaussian log likelihood (JAX).

    Parameters
    ----------
    theta : array (p,)
        Physics parameters in ``xpcsfit.parameters.MODES[mode]`` order.
    data : ShardData
    var : array (n_bins,)
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
        G = g1_squared_pairs(theta, mode, g["q"], L, g["phi"], g["t1"], g["t2"]) * g["mask"]
        G = jnp.broadcast_to(G, g["yc"].shape)
        b = g["bins"]
        n = data.n[b]
        sg = G.sum(axis=1)
        sgg = jnp.maximum((G * G).sum(axis=1) - sg * sg / n, 1e-300)
        syg = (g["yc"] * G).sum(axis=1)
        rss = data.syy[b] - syg * syg / sgg
        total = total + jnp.sum(-0.5 * rss / var[b] - 0.5 * jnp.log(sgg))
    return total
