"""One simulated file and its in-process fit, for the coverage tests: the z-scores of
J(t) and gamma_dot(t) at three times under the fit's covariance and the naive one.

A module of its own so that a spawned process pool can import it."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from xpcsfit.config import load_config
from xpcsfit.engine.evaluator import InProcessEvaluator
from xpcsfit.leastsq.driver import _plan, _solve
from xpcsfit.leastsq.results import covariance_from_normal_equations, transport_bands
from xpcsfit.model import enable_float64, shear_rate, transport_coefficient
from xpcsfit.parameters import MODES
from xpcsfit.simulate import TRUTH, simulate

# Every parameter determined (alpha, beta, offsets ≠ 0), so the estimates are in their
# Gaussian regime and coverage tests the standard errors, not a degenerate valley.
PARAMS = {"alpha": 0.3, "D_offset": 3.0e3, "beta": -0.2, "gamma_dot_t_offset": 2.0e-5}
THETA = np.array([(TRUTH | PARAMS)[n] for n in MODES["laminar_flow"]])
FRACTIONS = (0.2, 0.5, 0.8)  # of the window: the three times of the bands


def fit_z_scores(seed: int, speckle: bool, n_frames: int, n_phi: int, tile: int, sim: dict) -> np.ndarray:
    """(12,): z = (estimate − truth)/stderr of J and gamma_dot at the three times, under
    the fit's default covariance (first 6) and the naive one (last 6), one fit."""
    enable_float64()
    with tempfile.TemporaryDirectory() as d:
        path = simulate(Path(d) / f"cov{seed}.hdf", q=(0.0055,), n_phi=n_phi, n_frames=n_frames, seed=seed,
                        params=PARAMS, speckle=speckle, **sim)
        cfg = load_config({"initial": dict(zip(MODES["laminar_flow"], THETA))}, mode="laminar_flow",
                          gap=2.0e6, tile=tile)
        plan = _plan(path, cfg, dict(q=None, q_index=None, phi=None, frames=None, dt=None))
        ev = InProcessEvaluator([s.load() for s in plan.specs], plan.layout, cfg.mode, plan.L)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = _solve(ev, plan.ds, cfg, plan.layout, plan.L, plan.size, False)
    naive, _ = covariance_from_normal_equations(ev.last_block_sums[1].normal_equations().jtj, r.chi2, r.dof)
    t = np.asarray(FRACTIONS) * (n_frames - 1) * 0.1
    truth = np.r_[transport_coefficient(THETA, t), shear_rate(THETA, t)]
    z = []
    for cov in (r.covariance, naive):
        b = transport_bands("laminar_flow", r.values, cov, t)
        z.append((np.r_[b["J"], b["gamma_dot"]] - truth) / np.r_[b["J_stderr"], b["gamma_dot_stderr"]])
    return np.concatenate(z)
