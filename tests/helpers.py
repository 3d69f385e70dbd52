"""Small in-memory problems shared by the kernel, solver and evaluator tests."""

from __future__ import annotations

import dask.array as da
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from xpcsfit.engine.evaluator import InProcessEvaluator
from xpcsfit.engine.kernel import ParameterLayout
from xpcsfit.model import c2_model
from xpcsfit.parameters import DEFAULT_BOUNDS, MODES
from xpcsfit.engine.tiles import plan_tiles

L = 2.0e6
THETA = {
    "static": [2.0e4, 0.3, 3.0e3],
    "laminar_flow": [2.0e4, 0.3, 3.0e3, 2.0e-4, -0.2, 2.0e-5, 6.0],
}


def synthetic_dataset(mode, q=(0.004, 0.0055), phi=(10.0, 60.0, 120.0), n_t=70, dt=0.1,
                      noise=0.01, seed=0):
    """Model c2 plus Gaussian noise as an open_dataset-like Dataset (lower triangle NaN)."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, n_t + 1) * dt
    phi = np.asarray(phi, float)
    theta = np.asarray(THETA[mode])
    maps = []
    for iq, qv in enumerate(q):
        contrast = 0.2 + 0.02 * np.arange(phi.size) + 0.01 * iq
        offset = 1.0 + 0.005 * np.arange(phi.size)
        m = np.asarray(c2_model(theta, contrast, offset, mode, qv, L, phi, t, t))
        maps.append(m + noise * rng.standard_normal(m.shape))
    c2 = np.stack(maps)
    c2[..., np.tril_indices(n_t, -1)[0], np.tril_indices(n_t, -1)[1]] = np.nan
    return xr.Dataset(
        {"c2": (("q", "phi", "t1", "t2"), da.from_array(c2.astype(np.float32)))},
        coords={"q": list(q), "phi": phi, "t1": t, "t2": t},
        attrs={"source": "synthetic", "dt": dt, "frames": [1, n_t]},
    )


def in_process(ds, mode, tile=32):
    """Tiles of ``ds`` and an InProcessEvaluator over them."""
    tiles = [spec.load() for spec in plan_tiles(ds, tile)]
    layout = ParameterLayout(MODES[mode], ds.sizes["q"], ds.sizes["phi"])
    return InProcessEvaluator(tiles, layout, mode, L), layout


def dense_residual(ds, mode, layout):
    """r(x) over every fitted point, for jax.jacfwd: the dense reference."""
    c2 = np.nan_to_num(ds["c2"].values.astype(np.float64))
    t = ds["t1"].values
    mask = np.triu(np.ones((t.size, t.size), bool), 1)
    phi = ds["phi"].values

    def residual(x):
        theta = x[: layout.p]
        nb = layout.n_bins
        contrast = x[layout.p : layout.p + nb].reshape(layout.n_q, layout.n_phi)
        offset = x[layout.p + nb :].reshape(layout.n_q, layout.n_phi)
        parts = []
        for iq, qv in enumerate(ds["q"].values):
            m = c2_model(theta, contrast[iq], offset[iq], mode, qv, L, phi, t, t)
            parts.append((m - c2[iq])[:, mask].ravel())
        return jnp.concatenate(parts)

    return residual


def bounds(layout):
    lo = [DEFAULT_BOUNDS[n][0] for n in layout.physics]
    hi = [DEFAULT_BOUNDS[n][1] for n in layout.physics]
    nb = layout.n_bins
    return (np.array(lo + [0.0] * nb + [0.5] * nb), np.array(hi + [1.0] * nb + [1.5] * nb))


def start(layout, mode):
    theta = np.asarray(THETA[mode]) * np.array([0.7, 0.5, 0.5, 1.3, 0.5, 0.5, 0.5])[: layout.p]
    return layout.join(theta, np.full(layout.n_bins, 0.15), np.full(layout.n_bins, 1.02))


def dense_jacobian(residual, x):
    return np.asarray(jax.jacfwd(residual)(jnp.asarray(x)))
