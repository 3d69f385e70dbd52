"""The problem set: small in-memory fits that the kernel, evaluator, solver and driver
tests all run (optimistix style: define the problems once, parametrise the tests over
evaluators × problems).

A :class:`Problem` is model c2 plus Gaussian noise on a (q, phi, t1, t2) grid, as an
``open_dataset``-like Dataset (lower triangle NaN), with a start point away from the
truth, homodyne's bounds, the dense residual r(x) over every fitted point (the
reference the block sums are checked against) and scipy's least-squares solution.
Everything expensive is computed once per problem and session.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import dask.array as da
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from scipy.optimize import least_squares

from xpcsfit.engine.evaluator import InProcessEvaluator
from xpcsfit.engine.tiles import plan_tiles
from xpcsfit.model import c2_model, enable_float64
from xpcsfit.parameters import DEFAULT_BOUNDS, MODES, PER_BIN, ParameterLayout

L = 2.0e6
TILE = 32  # 70 frames: a 3 × 3 tile grid, edge tiles padded, lower tiles skipped
THETA = {
    "static": [2.0e4, 0.3, 3.0e3],
    "laminar_flow": [2.0e4, 0.3, 3.0e3, 2.0e-4, -0.2, 2.0e-5, 6.0],
}
START_FACTORS = [0.7, 0.5, 0.5, 1.3, 0.5, 0.5, 0.5]  # start = truth × these (physics)


@dataclass(frozen=True)
class Problem:
    """One identifiable fit (alpha, beta ≠ 0, non-zero offsets): every parameter determined."""

    name: str
    mode: str
    q: tuple[float, ...]
    phi: tuple[float, ...] = (10.0, 60.0, 120.0)
    n_t: int = 70
    dt: float = 0.1
    noise: float = 0.01
    seed: int = 0
    theta: tuple[float, ...] | None = None  # physics truth; default THETA[mode]

    @property
    def truth(self) -> np.ndarray:
        return np.asarray(THETA[self.mode] if self.theta is None else self.theta, float)

    def __str__(self) -> str:  # the pytest id
        return self.name

    @functools.cached_property
    def dataset(self) -> xr.Dataset:
        """c2 (q, phi, t1, t2) float32 as a dask array; attrs source, dt, frames."""
        enable_float64()  # the truth is computed in float64 whatever ran before
        rng = np.random.default_rng(self.seed)
        t = np.arange(1, self.n_t + 1) * self.dt
        phi = np.asarray(self.phi, float)
        maps = []
        for iq, qv in enumerate(self.q):
            contrast = 0.2 + 0.02 * np.arange(phi.size) + 0.01 * iq
            offset = 1.0 + 0.005 * np.arange(phi.size)
            m = np.asarray(c2_model(self.truth, contrast, offset, self.mode, qv, L, phi, t, t))
            maps.append(m + self.noise * rng.standard_normal(m.shape))
        c2 = np.stack(maps)
        below = np.tril_indices(self.n_t, -1)
        c2[..., below[0], below[1]] = np.nan
        return xr.Dataset(
            {"c2": (("q", "phi", "t1", "t2"), da.from_array(c2.astype(np.float32)))},
            coords={"q": list(self.q), "phi": phi, "t1": t, "t2": t},
            attrs={"source": "synthetic", "dt": self.dt, "frames": [1, self.n_t]},
        )

    @property
    def layout(self) -> ParameterLayout:
        return ParameterLayout(MODES[self.mode], len(self.q), len(self.phi))

    def specs(self, tile: int = TILE):
        return plan_tiles(self.dataset, tile)

    def tiles(self, tile: int = TILE):
        return [spec.load() for spec in self.specs(tile)]

    def in_process(self, tile: int = TILE) -> InProcessEvaluator:
        return InProcessEvaluator(self.tiles(tile), self.layout, self.mode, L)

    @property
    def start(self) -> np.ndarray:
        """x0 (P,): physics off the truth, contrast 0.15 and offset 1.02 in every bin."""
        theta = self.truth * np.array(START_FACTORS)[: self.layout.p]
        if self.theta is not None:  # a truth with zeros: start from THETA's offsets instead
            theta = np.where(theta == 0, np.asarray(THETA[self.mode]) * np.array(START_FACTORS)[: self.layout.p], theta)
        nb = self.layout.n_bins
        return self.layout.join(theta, np.full(nb, 0.15), np.full(nb, 1.02))

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """homodyne's default bounds (lower, upper), (P,) each."""
        nb = self.layout.n_bins
        b = np.array([DEFAULT_BOUNDS[n] for n in self.layout.physics]
                     + [DEFAULT_BOUNDS[n] for n in PER_BIN for _ in range(nb)])
        return b[:, 0], b[:, 1]

    @functools.cached_property
    def residual(self):
        """Jitted dense r(x) over every fitted point (q-major, then phi, then t1 < t2)."""
        ds, layout, mode = self.dataset, self.layout, self.mode
        c2 = np.nan_to_num(ds["c2"].values.astype(np.float64))
        t = ds["t1"].values
        mask = np.triu(np.ones((t.size, t.size), bool), 1)
        phi = ds["phi"].values

        @jax.jit
        def residual(x):
            theta, contrast, offset = layout.split(x)
            contrast = contrast.reshape(layout.n_q, layout.n_phi)
            offset = offset.reshape(layout.n_q, layout.n_phi)
            per_q = [(c2_model(theta, contrast[iq], offset[iq], mode, qv, L, phi, t, t) - c2[iq])[:, mask].ravel()
                     for iq, qv in enumerate(ds["q"].values)]
            return jnp.concatenate(per_q)

        return residual

    @functools.cached_property
    def jacobian(self):
        """Jitted dense Jacobian ∂r/∂x, (n, P), by forward mode."""
        return jax.jit(jax.jacfwd(self.residual))

    @functools.cached_property
    def dense_at_start(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(JᵀJ, Jᵀr, r) of the dense reference at :attr:`start`."""
        x = jnp.asarray(self.start)
        J = np.asarray(self.jacobian(x))
        r = np.asarray(self.residual(x))
        return J.T @ J, J.T @ r, r

    @functools.cached_property
    def scipy_solution(self):
        """scipy's least_squares (trf, x_scale="jac", tolerances 1e-12) from :attr:`start`."""
        lo, hi = self.bounds
        return least_squares(lambda x: np.asarray(self.residual(x)), self.start,
                             jac=lambda x: np.asarray(self.jacobian(x)), bounds=(lo, hi),
                             x_scale="jac", method="trf", ftol=1e-12, xtol=1e-12, gtol=1e-12)


STATIC_1Q = Problem("static-1q", "static", (0.0055,))
STATIC_2Q = Problem("static-2q", "static", (0.004, 0.0055))
FLOW_1Q = Problem("laminar_flow-1q", "laminar_flow", (0.0055,))
FLOW_2Q = Problem("laminar_flow-2q", "laminar_flow", (0.004, 0.0055))
PROBLEMS = [STATIC_1Q, STATIC_2Q, FLOW_1Q, FLOW_2Q]


def aging_dataset(a=2.0e4, b=2.0e3, q=0.0055, phi=(10.0, 60.0), n_t=500, dt=0.1, noise=0.02, seed=0):
    """A static map of an aging sample: J(t) = a − b·ln t (Å²/s), which the model's
    D0·t**alpha + D_offset reaches only as alpha → 0 with D0 → ∞ (D0·alpha → −b,
    D0 + D_offset → a). c2 = offset + contrast·exp(−q² ∫J dt) (model.py's g1², DESIGN.md §2)
    with ∫_{t1}^{t2} J dt = a(t2 − t1) − b[t ln t − t]_{t1}^{t2}, plus Gaussian noise;
    contrast 0.25, offset 1; frame k at t = k·dt. Dataset as :attr:`Problem.dataset`."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, n_t + 1) * dt
    F = a * t - b * (t * np.log(t) - t)  # an antiderivative of J
    integral = F[None, :] - F[:, None]
    g2 = np.exp(-(q * q) * np.abs(integral))
    c2 = np.stack([1.0 + 0.25 * g2 + noise * rng.standard_normal(g2.shape) for _ in phi])[None]
    below = np.tril_indices(n_t, -1)
    c2[..., below[0], below[1]] = np.nan
    return xr.Dataset(
        {"c2": (("q", "phi", "t1", "t2"), da.from_array(c2.astype(np.float32)))},
        coords={"q": [q], "phi": np.asarray(phi, float), "t1": t, "t2": t},
        attrs={"source": "synthetic-aging", "dt": dt, "frames": [1, n_t]},
    )
