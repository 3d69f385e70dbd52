"""The bounded Levenberg–Marquardt solver, on its own and against scipy."""

import numpy as np
import pytest
from scipy.optimize import least_squares, lsq_linear

from helpers import bounds, dense_jacobian, dense_residual, in_process, start, synthetic_dataset
from xpcsfit.solver import NormalEquations, TrustRegionLM, solve_box_qp


@pytest.mark.parametrize("seed", range(8))
def test_box_qp_matches_bounded_least_squares(seed):
    rng = np.random.default_rng(seed)
    n = 6
    R = rng.standard_normal((n, n)) + 3 * np.eye(n)
    H = R.T @ R
    g = rng.standard_normal(n) * 5
    lo = -rng.uniform(0, 1, n)
    hi = rng.uniform(0, 1, n)
    s = solve_box_qp(H, g, lo, hi)
    # ½ sᵀHs + gᵀs = ½‖R s + R⁻ᵀ g‖² + const
    ref = lsq_linear(R, -np.linalg.solve(R.T, g), bounds=(lo, hi), tol=1e-14).x
    np.testing.assert_allclose(s, ref, atol=1e-8)


class DenseProblem:
    """Evaluator over an explicit residual function (for solver-only tests)."""

    def __init__(self, residual, jacobian):
        self.residual, self.jacobian = residual, jacobian

    def normal_equations(self, x):
        r, J = self.residual(x), self.jacobian(x)
        return NormalEquations(J.T @ J, J.T @ r, 0.5 * r @ r, r.size)

    def costs(self, xs):
        return np.array([0.5 * np.sum(self.residual(x) ** 2) for x in xs])


def test_rosenbrock_with_active_bound():
    res = lambda x: np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])  # noqa: E731
    jac = lambda x: np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])  # noqa: E731
    lo, hi = np.array([-2.0, -2.0]), np.array([0.8, 2.0])
    state = TrustRegionLM(lo, hi, ftol=1e-14, xtol=1e-14, gtol=1e-12).solve(DenseProblem(res, jac), [-1.2, 1.0])
    ref = least_squares(res, [-1.2, 1.0], jac=jac, bounds=(lo, hi), ftol=1e-14, xtol=1e-14, gtol=1e-14)
    assert state.converged
    np.testing.assert_allclose(state.x, ref.x, atol=1e-7)
    assert state.x[0] == pytest.approx(0.8)


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_final_cost_equals_scipy_least_squares(mode):
    # Identifiable problem (alpha = 0.3, D_offset ≠ 0); same start, bounds and model.
    ds = synthetic_dataset(mode)
    ev, layout = in_process(ds, mode)
    x0 = start(layout, mode)
    lo, hi = bounds(layout)
    state = TrustRegionLM(lo, hi).solve(ev, x0)
    residual = dense_residual(ds, mode, layout)
    ref = least_squares(lambda x: np.asarray(residual(x)), x0,
                        jac=lambda x: dense_jacobian(residual, x), bounds=(lo, hi),
                        x_scale="jac", method="trf", ftol=1e-12, xtol=1e-12, gtol=1e-12)
    assert state.converged, state.termination
    assert state.ne.cost == pytest.approx(ref.cost, rel=1e-6)
    # A rejected step costs a cost pass, never a normal-equations pass.
    assert state.normal_passes == state.iteration + 1


def test_nonconvergence_is_reported_honestly():
    ds = synthetic_dataset("static")
    ev, layout = in_process(ds, "static")
    lo, hi = bounds(layout)
    state = TrustRegionLM(lo, hi, max_iterations=1).solve(ev, start(layout, "static"))
    assert not state.converged
    assert "max_iterations" in state.termination
