"""Shared fixtures: the APS data beside the checkout, a LocalCluster, small simulations."""

from __future__ import annotations

from pathlib import Path

import pytest

import xpcsfit

from data_paths import SHARED_DATA

# The tests call the model (and simulate, and the kernels) directly: float64 for the
# whole session, as xpcsfit's own entry points set it (xpcsfit.enable_float64).
xpcsfit.enable_float64()



@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "flow_small.hdf").exists():
        pytest.skip(f"shared APS data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def client():
    """A 2-worker LocalCluster on 127.0.0.1, shared by the tests of the session."""
    from distributed import Client

    from xpcsfit.engine.cluster import local_cluster

    with local_cluster(2) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def small_flow_file(tmp_path_factory) -> Path:
    """A simulated laminar_flow APS-U file: 1 q × 4 phi × 160 frames, noise 0.01."""
    from xpcsfit.simulate import simulate

    path = tmp_path_factory.mktemp("sim") / "small_flow.hdf"
    return simulate(path, q=(0.0055,), n_phi=4, n_frames=160, noise=0.01, seed=3)


@pytest.fixture(scope="session")
def static_file(tmp_path_factory):
    """static, 1 q × 3 phi × 120 frames, iid noise sd 0.01, contrast 0.25 and offset 1."""
    from xpcsfit.simulate import simulate

    path = tmp_path_factory.mktemp("sim") / "static.hdf"
    return simulate(path, mode="static", q=[0.015], n_phi=3, n_frames=120, dt=0.01,
                    params={"alpha": -0.6, "D_offset": 5.0e3, "D0": 1.0e4}, noise=0.01, seed=3)
