"""The legacy layout: the writer's round trips, the optional timing keys, layout detection."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from xpcsfit.errors import InputError
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.legacy import write_legacy

from io_helpers import random_maps, upper_mask


def test_legacy_round_trip(tmp_path):
    n = 25
    q_grid, phi_grid = [0.0021, 0.0042], [-30.0, 0.0, 30.0]
    cells = [(iq, ip) for iq in range(2) for ip in range(3)]
    arrays = random_maps(cells, n, seed=3)
    path = write_legacy(
        tmp_path / "legacy.hdf", q_grid=q_grid, phi_grid=phi_grid, maps=arrays,
        exposure_period=0.02, avg_frames=2, stride_frames=5,
    )
    ds = open_dataset(path, frames=(2, 24))
    assert ds.attrs["layout"] == "legacy"
    assert ds.attrs["dt"] == pytest.approx(0.2)
    assert ds.attrs["q_index"] == [0, 1]
    np.testing.assert_allclose(ds["q"].values, q_grid)
    np.testing.assert_allclose(ds["phi"].values, phi_grid)
    upper = upper_mask(n - 2)
    for iq, ip in cells:
        got = ds["c2"].values[iq, ip]
        np.testing.assert_array_equal(got[upper], arrays[(iq, ip)][2:, 2:][upper])
        assert np.all(np.isnan(got[~upper]))
    assert open_dataset(path, q=0.0042, phi=[31]).attrs["q_index"] == [1]


def test_legacy_without_avg_stride_uses_exposure(tmp_path):
    arrays = random_maps([(0, 0)], 10)
    path = write_legacy(tmp_path / "l.hdf", q_grid=[0.002], phi_grid=[0.0], maps=arrays, exposure_period=0.07)
    assert open_dataset(path).attrs["dt"] == pytest.approx(0.07)



def test_layout_told_by_the_map_group(tmp_path):
    arrays = random_maps([(0, 0)], 10)
    path = write_legacy(tmp_path / "both.hdf", q_grid=[0.002], phi_grid=[0.0], maps=arrays, exposure_period=0.1)
    with h5py.File(path, "r+") as f:
        f.create_group("/xpcs/twotime/correlation_map")
    with pytest.raises(InputError, match="holds both /xpcs/twotime/correlation_map and /exchange/C2T_all; layout is ambiguous"):
        open_dataset(path)
    with h5py.File(path, "r+") as f:
        del f["/xpcs/twotime/correlation_map"], f["/exchange/C2T_all"]
    with pytest.raises(InputError, match="missing key /xpcs/twotime/correlation_map .APS-U layout. or /exchange/C2T_all"):
        open_dataset(path)
