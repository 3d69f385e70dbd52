"""What the data determine: the quantities' derivatives, the drift record, and a
covariance that cannot be computed (a warning, not a crash)."""

import numpy as np
import pytest
from problems import FLOW_1Q

from xpcsfit.config import load_config
from xpcsfit.leastsq import driver
from xpcsfit.leastsq.determined import (
    DriftLog,
    determined_quantities,
    undetermined_record,
)
from xpcsfit.parameters import MODES, ParameterLayout
from xpcsfit.solver import TrustRegionLM


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_quantities_jacobian_matches_finite_differences(mode):
    layout = ParameterLayout(MODES[mode], 1, 2)
    q = determined_quantities(layout, mode, np.linspace(0.1, 50, 16))
    x = np.array([2e4, 0.3, 3e3, 2e-4, -0.2, 2e-5, 6.0][: layout.p] + [0.2, 0.22, 1.0, 1.01])
    values, G = q(x)
    assert values.shape[0] == G.shape[0] == 16 * (2 if mode == "laminar_flow" else 1) + \
        (1 if mode == "laminar_flow" else 0) + 4
    h = 1e-6 * np.maximum(np.abs(x), 1e-3)
    fd = np.stack([(q(x + h * e)[0] - q(x - h * e)[0]) / (2 * h_i) for e, h_i in zip(np.eye(x.size), h)], axis=1)
    np.testing.assert_allclose(G, fd, rtol=1e-6, atol=1e-6 * np.abs(values).max())


def test_drift_is_measured_over_the_settled_run_only():
    log = DriftLog(["D0", "alpha", "D_offset"], np.array([1e2, -2, -1e5]), np.array([1e5, 2, 1e5]))
    log.add([1e3, 0.5, 0.0], 0)  # far moves before the run of settled steps do not count
    log.add([2e4, 0.01, 100.0], 0)
    log.add([2.1e4, 0.01, -900.0], 1)
    log.add([2.2e4, 0.01, -1900.0], 2)
    drift = log.drifted()
    assert set(drift) == {"D0", "D_offset"} and log.iterations == 2
    assert drift["D0"] == pytest.approx(2e3 / 2.2e4)
    record, warnings = undetermined_record(drift, log.iterations, converged=True)
    assert record["parameters"] == ["D0", "D_offset"]
    assert "D0, D_offset still drifted over the last 2 iterations" in warnings[0]
    assert undetermined_record(drift, 2, converged=False) == (None, [])
    assert undetermined_record({}, 2, converged=True) == (None, [])


def test_covariance_failure_is_a_warning(monkeypatch):
    # numpy's "Eigenvalues did not converge" in the covariance: the fit still returns,
    # with NaN standard errors and bands, and says why.
    problem = FLOW_1Q
    lo, hi = problem.bounds
    ev = problem.in_process()
    state = TrustRegionLM(lo, hi, max_iterations=2).solve(ev, problem.start)
    cfg = load_config(None, mode=problem.mode)

    def failing(*args, **kwargs):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr("xpcsfit.leastsq.results.np.linalg.eigh", failing)
    r = driver._result(state, "test", ev, problem.dataset, cfg, problem.layout)
    assert any("covariance could not be computed (Eigenvalues did not converge)" in w for w in r.warnings)
    assert np.all(np.isnan(r.stderr)) and np.all(np.isnan(r.transport["J_stderr"]))
    assert np.all(np.isfinite(r.values))
