"""Fixtures of the CMC tests: small simulated files (one simulation per session)."""

from __future__ import annotations

import pytest

from xpcsfit.simulate import simulate

# An identifiable laminar_flow problem: J(t) and gamma_dot(t) curve over the window
# (alpha, beta != 0, non-zero offsets), iid noise, so that every physics parameter is
# determined and full-data NUTS is cheap.
SIM_TRUTH = dict(D0=1.0e4, alpha=-0.6, D_offset=5.0e3, gamma_dot_t0=1.0e-3, beta=0.5,
                 gamma_dot_t_offset=5.0e-4, phi0=6.0)
SIM = dict(q=[0.015], n_phi=4, n_frames=160, dt=0.01, noise=0.005, seed=1)


@pytest.fixture(scope="session")
def sim_truth() -> dict:
    return dict(SIM_TRUTH)


@pytest.fixture(scope="session")
def sim_file(tmp_path_factory):
    """laminar_flow with the parameters of ``sim_truth``: 1 q × 4 phi × 160 frames."""
    return simulate(tmp_path_factory.mktemp("cmc") / "sim.hdf", mode="laminar_flow", params=SIM_TRUTH, **SIM)


@pytest.fixture(scope="session")
def flow_small(shared_data):
    """The shared APS file flow_small.hdf (skips where it is absent)."""
    return shared_data / "flow_small.hdf"
