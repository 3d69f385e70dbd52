"""The bounded Levenberg–Marquardt solver, on its own and against scipy, over the
problem set (tests/problems.py) with the in-process evaluator."""

import json

import numpy as np
import pytest
from scipy.optimize import least_squares, lsq_linear

from xpcsfit.boxqp import solve_box_qp
from xpcsfit.config import SolverOptions
from xpcsfit.engine.sums import NormalEquations
from xpcsfit.solver import Termination, TrustRegionLM, TrustRegionOptions

from problems import PROBLEMS, STATIC_2Q


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


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_final_cost_equals_scipy_least_squares(problem):
    # Identifiable problems (alpha = 0.3, D_offset ≠ 0); same start, bounds and model.
    lo, hi = problem.bounds
    solver = TrustRegionLM(lo, hi)
    state = solver.solve(problem.in_process(), problem.start)
    assert state.converged, solver.message(state)
    assert state.ne.cost == pytest.approx(problem.scipy_solution.cost, rel=1e-6)
    # A rejected step costs a cost pass, never a normal-equations pass.
    assert state.normal_passes == state.iteration + 1
    assert solver.terminate(state) == (True, state.termination)


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_nonconvergence_is_reported_honestly(problem):
    lo, hi = problem.bounds
    solver = TrustRegionLM(lo, hi, max_iterations=1)
    state = solver.solve(problem.in_process(), problem.start)
    assert state.termination is Termination.MAX_ITERATIONS and not state.converged
    assert solver.message(state) == "reached max_iterations=1 (not converged)"


def test_termination_messages_name_the_tolerance_that_applied():
    options = TrustRegionOptions(ftol=1e-9, xtol=1e-11, gtol=1e-7, max_iterations=7)
    messages = {t: t.message(options) for t in Termination}
    assert messages[Termination.FTOL] == "relative cost reduction below ftol=1e-09"
    assert messages[Termination.XTOL] == "scaled step below xtol=1e-11"
    assert messages[Termination.GTOL] == "gradient below gtol=1e-07"
    assert messages[Termination.NO_REDUCTION] == "no reduction possible within floating-point precision"
    assert "even at damping 1e+16" in messages[Termination.DAMPING_LIMIT]
    assert {t for t in Termination if not t.converged} == {Termination.MAX_ITERATIONS, Termination.DAMPING_LIMIT}
    assert all("not converged" in m for t, m in messages.items() if not t.converged)


def test_config_defaults_are_the_solver_defaults():
    assert SolverOptions().model_dump() == {
        k: getattr(TrustRegionOptions(), k) for k in ("max_iterations", "ftol", "xtol", "gtol")}


def test_init_step_terminate_on_an_explicit_state():
    # The state is a value: stepping a copy leaves the original usable, and a state that
    # went through JSON steps the same way.
    lo, hi = STATIC_2Q.bounds
    ev = STATIC_2Q.in_process()
    solver = TrustRegionLM(lo, hi)
    state = solver.init(ev, STATIC_2Q.start)
    assert solver.terminate(state) == (False, None) and solver.message(state) == ""
    one = solver.step(ev, state)
    again = solver.step(ev, state)
    assert np.array_equal(one.x, again.x) and one.iteration == again.iteration == 1
    assert json.loads(json.dumps(one.saved()))["termination"] is None
