"""The APS-U layout: reading flow_small.hdf, the writer's round trips, each key validated."""

from __future__ import annotations

import hashlib
import shutil

import dask.array as da
import h5py
import numpy as np
import pytest

from xpcsfit.errors import InputError
from xpcsfit.io.apsu import write_aps_u
from xpcsfit.io.dataset import open_dataset

from io_helpers import FLOW, MAPS, README_PHI, h5_maps, random_maps, upper_mask


def test_flow_small_q_index_8():
    ds = open_dataset(FLOW, q_index=8)
    c2 = ds["c2"]
    assert c2.dims == ("q", "phi", "t1", "t2")
    assert c2.shape == (1, 8, 499, 499)
    assert c2.dtype == np.float32
    assert isinstance(c2.data, da.Array)
    assert c2.data.chunks[:2] == ((1,), (8,)) and c2.data.chunks[2][:2] == (255, 244)
    assert ds["q"].values == pytest.approx([0.005555], rel=2e-4)
    assert ds["phi"].values == pytest.approx(README_PHI, abs=0.06)
    assert ds["q"].attrs["units"] == "1/Å" and ds["phi"].attrs["units"] == "deg"
    assert ds["t1"].attrs["units"] == "s"
    assert ds.attrs["dt"] == pytest.approx(0.1)
    assert ds.attrs["frames"] == [1, 499]
    assert ds.attrs["n_frames"] == 500
    assert ds.attrs["layout"] == "aps-u"
    assert ds.attrs["q_index"] == [8]
    assert ds.attrs["source"] == str(FLOW.resolve())
    assert "store" not in ds.attrs and "L" not in ds.attrs
    assert ds["t1"].values[0] == pytest.approx(0.1) and ds["t2"].values[-1] == pytest.approx(49.9)

    values = c2.values[0]
    expected = h5_maps(FLOW, [f"c2_{i:05d}" for i in range(17, 25)])
    upper = upper_mask(499)
    assert np.all(np.isnan(values[:, ~upper]))
    np.testing.assert_array_equal(values[:, upper], expected[:, upper])
    assert np.all(np.isfinite(values[:, upper]))


def test_sha256_matches_hashlib():
    ds = open_dataset(FLOW, q_index=0, phi=[11.4])
    assert ds.attrs["sha256"] == hashlib.sha256(FLOW.read_bytes()).hexdigest()


def test_aps_u_writer_round_trip_with_band_callables(tmp_path):
    n = 40
    arrays = random_maps([(0, 0), (0, 1), (1, 0), (1, 1)], n)
    maps = {cell: (lambda a, b, m=m: m[a:b]) for cell, m in arrays.items()}
    path = write_aps_u(
        tmp_path / "w.hdf", q_grid=[0.002, 0.004], phi_grid=[0.0, 90.0], maps=maps,
        frame_time=0.01, stride_frame=2, avg_frame=3, n_frames=n,
    )
    ds = open_dataset(path)
    assert ds.attrs["dt"] == pytest.approx(0.06)
    assert ds.attrs["layout"] == "aps-u"
    upper = upper_mask(n - 1)
    for iq in range(2):
        for ip in range(2):
            got = ds["c2"].values[iq, ip]
            np.testing.assert_array_equal(got[upper], arrays[(iq, ip)][1:, 1:][upper])
            assert np.all(np.isnan(got[~upper]))
    with h5py.File(path, "r") as f:  # lower triangle stored as 0, like boost_corr
        m = f[f"{MAPS}/c2_00001"][()]
        assert np.all(m[np.tril_indices(n, -1)] == 0)


def test_full_symmetric_file_reads_like_upper(tmp_path):
    n = 30
    m = random_maps([(0, 0)], n)[(0, 0)]
    full = np.triu(m) + np.triu(m, 1).T
    p1 = write_aps_u(tmp_path / "u.hdf", q_grid=[0.003], phi_grid=[0.0], maps={(0, 0): m}, frame_time=0.1)
    p2 = write_aps_u(tmp_path / "f.hdf", q_grid=[0.003], phi_grid=[0.0], maps={(0, 0): m}, frame_time=0.1)
    with h5py.File(p2, "r+") as f:
        f[f"{MAPS}/c2_00001"][...] = full
    a = open_dataset(p1)["c2"].values
    b = open_dataset(p2)["c2"].values
    np.testing.assert_array_equal(a, b)


def test_map_names_phi_q_order_and_index_mapping(tmp_path):
    """A [phi, q] grid with a non-identity dynamic_index_mapping places maps the same."""
    n = 20
    q_grid, phi_grid = [0.002, 0.003, 0.004], [10.0, 50.0]
    arrays = random_maps([(0, 1), (2, 0), (2, 1)], n)
    ref = write_aps_u(tmp_path / "ref.hdf", q_grid=q_grid, phi_grid=phi_grid, maps=arrays, frame_time=0.1)
    swapped = tmp_path / "swapped.hdf"
    shutil.copy(ref, swapped)
    n_q, n_phi = len(q_grid), len(phi_grid)
    mapping = np.zeros(n_q * n_phi, np.int64)
    for iq in range(n_q):
        for ip in range(n_phi):
            mapping[iq * n_phi + ip] = ip * n_q + iq  # [phi, q]: absolute = phi_idx * n_q + q_idx
    with h5py.File(swapped, "r+") as f:
        q = f["/xpcs/qmap"]
        for key in ("dynamic_v_list_dim0", "dynamic_v_list_dim1", "dynamic_num_pts",
                    "map_names", "dynamic_index_mapping"):
            del q[key]
        q["dynamic_v_list_dim0"] = np.array(phi_grid)
        q["dynamic_v_list_dim1"] = np.array(q_grid)
        q["dynamic_num_pts"] = np.array([n_phi, n_q])
        q["map_names"] = np.array([b"phi", b"q"], dtype=object)
        q["dynamic_index_mapping"] = mapping
    a, b = open_dataset(ref, q_index=2), open_dataset(swapped, q_index=2)
    np.testing.assert_array_equal(a["q"].values, b["q"].values)
    np.testing.assert_array_equal(a["phi"].values, b["phi"].values)
    np.testing.assert_array_equal(a["c2"].values, b["c2"].values)
    assert b.attrs["q_index"] == [2]
    upper = upper_mask(n - 1)
    np.testing.assert_array_equal(b["c2"].values[0, 1][upper], arrays[(2, 1)][1:, 1:][upper])


@pytest.mark.parametrize(
    "key",
    [
        "/xpcs/twotime/processed_bins",
        "/xpcs/qmap/dynamic_index_mapping",
        "/xpcs/qmap/dynamic_v_list_dim0",
        "/xpcs/qmap/map_names",
        "/entry/instrument/detector_1/frame_time",
        "/xpcs/twotime/config/stride_frame",
    ],
)
def test_missing_key(flow_copy, key):
    with h5py.File(flow_copy, "r+") as f:
        del f[key]
    with pytest.raises(InputError, match=f"missing key {key}$"):
        open_dataset(flow_copy, q_index=8)


def test_missing_map_group(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        del f[MAPS]
    with pytest.raises(InputError, match="missing key /xpcs/twotime/correlation_map"):
        open_dataset(flow_copy)


def test_processed_bins_length_mismatch(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        bins = f["/xpcs/twotime/processed_bins"][()]
        del f["/xpcs/twotime/processed_bins"]
        f["/xpcs/twotime/processed_bins"] = bins[:-1]
    with pytest.raises(InputError, match="processed_bins has 23 entries but .* 24 maps"):
        open_dataset(flow_copy)


def test_bin_outside_index_mapping(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        f["/xpcs/twotime/processed_bins"][0] = 73
    with pytest.raises(InputError, match="processed_bins value 73 .*c2_00001"):
        open_dataset(flow_copy)


def test_non_finite_grid(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        f["/xpcs/qmap/dynamic_v_list_dim1"][3] = np.nan
    with pytest.raises(InputError, match="dynamic_v_list_dim1 holds non-finite"):
        open_dataset(flow_copy)


@pytest.mark.parametrize("frame_time", [0.0, -0.1, np.nan])
def test_non_positive_dt_in_file(tmp_path, frame_time):
    arrays = random_maps([(0, 0)], 10)
    path = write_aps_u(tmp_path / "dt.hdf", q_grid=[0.002], phi_grid=[0.0], maps=arrays, frame_time=frame_time)
    with pytest.raises(InputError, match="dt.hdf: /entry/instrument/detector_1/frame_time = .* not a finite positive"):
        open_dataset(path)
    assert open_dataset(path, dt=0.5).attrs["dt"] == 0.5  # an explicit dt does not need the file's


def test_non_positive_avg_frame_in_file(tmp_path):
    arrays = random_maps([(0, 0)], 10)
    path = write_aps_u(tmp_path / "a.hdf", q_grid=[0.002], phi_grid=[0.0], maps=arrays, frame_time=0.1, avg_frame=0)
    with pytest.raises(InputError, match="/xpcs/twotime/config/avg_frame = 0.0"):
        open_dataset(path)

