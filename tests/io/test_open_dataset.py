"""open_dataset's selection: q, q_index, phi, frames, dt, tile; its one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest

from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io.apsu import write_aps_u
from xpcsfit.io.dataset import open_dataset

from io_helpers import FLOW, h5_maps, random_maps, upper_mask


def test_q_value_selection():
    assert open_dataset(FLOW, q=0.0030).attrs["q_index"] == [4]
    # nearest with maps, duplicates removed, ascending in q
    ds = open_dataset(FLOW, q=[0.0056, 0.0016, 0.00555])
    assert ds.attrs["q_index"] == [0, 8]
    assert np.all(np.diff(ds["q"].values) > 0)


def test_all_q_by_default():
    ds = open_dataset(FLOW)
    assert ds.attrs["q_index"] == [0, 4, 8]
    assert ds["q"].values == pytest.approx([0.001621, 0.003001, 0.005555], rel=2e-4)
    assert ds["c2"].shape == (3, 8, 499, 499)


def test_q_index_sequence_sorted_and_deduplicated():
    assert open_dataset(FLOW, q_index=[8, 0, 8]).attrs["q_index"] == [0, 8]


def test_phi_subset():
    ds = open_dataset(FLOW, q_index=8, phi=[168.0, 11.0, 12.0])
    assert ds["phi"].values == pytest.approx([11.38, 168.62], abs=0.01)
    expected = h5_maps(FLOW, ["c2_00017", "c2_00024"])
    upper = upper_mask(499)
    np.testing.assert_array_equal(ds["c2"].values[0][:, upper], expected[:, upper])


def test_frames_subset():
    ds = open_dataset(FLOW, q_index=4, phi=[33.8], frames=(10, 200))
    assert ds["t1"].values[0] == 1.0
    assert ds["t2"].values[-1] == pytest.approx(20.0)
    assert ds["c2"].shape == (1, 1, 191, 191)
    assert ds.attrs["frames"] == [10, 200]
    expected = h5_maps(FLOW, ["c2_00010"], 10, 200)[0]
    upper = upper_mask(191)
    got = ds["c2"].values[0, 0]
    np.testing.assert_array_equal(got[upper], expected[upper])
    assert np.all(np.isnan(got[~upper]))


def test_dt_override_scales_time():
    ds = open_dataset(FLOW, q_index=8, dt=0.25, frames=(4, 20))
    assert ds.attrs["dt"] == 0.25
    assert ds["t1"].values[0] == 1.0


def test_tile_sets_chunks_aligned_to_absolute_frames():
    # frames 1 … 499: chunk edges at frames 100, 200, … like the fit's tiles
    ds = open_dataset(FLOW, q_index=[0, 8], tile=100)
    assert ds["c2"].data.chunks == ((1, 1), (8,), (99,) + (100,) * 4, (99,) + (100,) * 4)
    ds = open_dataset(FLOW, q_index=8, tile=100, frames=(100, 349))
    assert ds["c2"].data.chunks[2] == (100, 100, 50)


def test_q_not_in_file():
    with pytest.raises(ConfigError, match=r"q = 0.02 1/Å.*available: 0.00162109, 0.0030009, 0.00555514"):
        open_dataset(FLOW, q=0.02)
    # 0.00189 is on the grid but has no maps: the nearest q with maps is > 5 % away
    with pytest.raises(ConfigError, match="q = 0.00189"):
        open_dataset(FLOW, q=0.00189)


def test_q_index_without_maps_or_out_of_range():
    with pytest.raises(ConfigError, match=r"q_index = 3 .*indices with maps: \[0, 4, 8\]"):
        open_dataset(FLOW, q_index=3)
    with pytest.raises(ConfigError, match="q_index = 9: out of range 0..8"):
        open_dataset(FLOW, q_index=9)
    with pytest.raises(ConfigError, match="not both"):
        open_dataset(FLOW, q=0.003, q_index=4)


def test_phi_errors():
    with pytest.raises(ConfigError, match="empty phi selection"):
        open_dataset(FLOW, q_index=8, phi=[])
    with pytest.raises(ConfigError, match="phi = -20 deg"):
        open_dataset(FLOW, q_index=8, phi=[11.4, -20])


def test_missing_q_phi_map(tmp_path):
    arrays = random_maps([(0, 0), (0, 1), (1, 0)], 12)
    path = write_aps_u(tmp_path / "m.hdf", q_grid=[0.002, 0.004], phi_grid=[0.0, 90.0], maps=arrays, frame_time=0.1)
    with pytest.raises(InputError, match=r"no two-time map for q=0.004 1/Å \(index 1\), phi=90 deg"):
        open_dataset(path, q_index=1)
    assert open_dataset(path, q_index=1, phi=[0]).attrs["q_index"] == [1]


@pytest.mark.parametrize("dt", [0, -1.0, np.nan, np.inf, "0.1", True])
def test_bad_dt_override(dt):
    with pytest.raises(ConfigError, match="dt = .*must be a finite number > 0"):
        open_dataset(FLOW, q_index=8, dt=dt)


@pytest.mark.parametrize(
    "frames, message",
    [
        ((0, 100), "frame 0 sits at t = 0 where t\\*\\*alpha is singular; start at 1 or later"),
        ((1, 500), "need 1 <= A < B <= 499"),
        ((50, 50), "need 1 <= A < B <= 499"),
        ((60, 50), "need 1 <= A < B <= 499"),
        ((-3, 50), "need 1 <= A < B <= 499"),
        ((1.5, 50), "must be integers"),
        ((1, 2, 3), "expected two frame indices"),
    ],
)
def test_bad_frames(frames, message):
    with pytest.raises(ConfigError, match=message):
        open_dataset(FLOW, q_index=8, frames=frames)


def test_bad_tile():
    with pytest.raises(ConfigError, match="tile = 0"):
        open_dataset(FLOW, q_index=8, tile=0)


def test_compute_on_process_workers(client):
    ds = open_dataset(FLOW, q_index=[4, 8], phi=[33.8, 146.1], frames=(1, 300), tile=128)
    expected = ds["c2"].compute(scheduler="threads").values  # in this process
    got = client.compute(ds["c2"].data).result()  # the session's worker processes
    np.testing.assert_array_equal(got, expected)

