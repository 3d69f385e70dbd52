"""Reading APS result files: open_dataset on HDF5 input, the writer, validation."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import xarray as xr

from xpcsfit.io.writers import write_aps_u, write_legacy
from xpcsfit.io.dataset import check_tile_finite, open_dataset, validate_finite
from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io.hdf5 import C2Reader, read_info

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLOW = DATA / "flow_small.hdf"
README_PHI = [11.4, 33.8, 56.3, 78.9, 101.3, 123.6, 146.1, 168.6]
MAPS = "/xpcs/twotime/correlation_map"


def _h5_maps(path, names, a=1, b=499):
    with h5py.File(path, "r") as f:
        return np.stack([f[f"{MAPS}/{n}"][a : b + 1, a : b + 1] for n in names])


def _upper(n):
    return np.triu(np.ones((n, n), dtype=bool))


def _random_maps(cells, n, seed=0):
    rng = np.random.default_rng(seed)
    return {cell: (1.0 + rng.random((n, n))).astype(np.float32) for cell in cells}


# --------------------------------------------------------------------------- APS-U file


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
    expected = _h5_maps(FLOW, [f"c2_{i:05d}" for i in range(17, 25)])
    upper = _upper(499)
    assert np.all(np.isnan(values[:, ~upper]))
    np.testing.assert_array_equal(values[:, upper], expected[:, upper])
    assert np.all(np.isfinite(values[:, upper]))


def test_sha256_matches_hashlib():
    ds = open_dataset(FLOW, q_index=0, phi=[11.4])
    assert ds.attrs["sha256"] == hashlib.sha256(FLOW.read_bytes()).hexdigest()


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
    expected = _h5_maps(FLOW, ["c2_00017", "c2_00024"])
    upper = _upper(499)
    np.testing.assert_array_equal(ds["c2"].values[0][:, upper], expected[:, upper])


def test_frames_subset():
    ds = open_dataset(FLOW, q_index=4, phi=[33.8], frames=(10, 200))
    assert ds["t1"].values[0] == 1.0
    assert ds["t2"].values[-1] == pytest.approx(20.0)
    assert ds["c2"].shape == (1, 1, 191, 191)
    assert ds.attrs["frames"] == [10, 200]
    expected = _h5_maps(FLOW, ["c2_00010"], 10, 200)[0]
    upper = _upper(191)
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


def test_reader_pickles_and_skips_lower_blocks(tmp_path):
    info = read_info(FLOW)
    keys = [[info.maps[(8, p)] for p in range(8)]]
    reader = pickle.loads(pickle.dumps(C2Reader(info.path, keys, (1, 499))))
    assert reader.shape == (1, 8, 499, 499)
    assert np.all(np.isnan(reader[:, :, 300:400, 0:100]))
    diag = reader[0, 2, 10:20, 10:20]
    assert diag.shape == (10, 10)
    assert np.isnan(diag[5, 4]) and np.isfinite(diag[4, 5]) and np.isfinite(diag[4, 4])


# --------------------------------------------------------------------------- writer round trips


def test_aps_u_writer_round_trip_with_band_callables(tmp_path):
    n = 40
    arrays = _random_maps([(0, 0), (0, 1), (1, 0), (1, 1)], n)
    maps = {cell: (lambda a, b, m=m: m[a:b]) for cell, m in arrays.items()}
    path = write_aps_u(
        tmp_path / "w.hdf", q_grid=[0.002, 0.004], phi_grid=[0.0, 90.0], maps=maps,
        frame_time=0.01, stride_frame=2, avg_frame=3, n_frames=n,
    )
    ds = open_dataset(path)
    assert ds.attrs["dt"] == pytest.approx(0.06)
    assert ds.attrs["layout"] == "aps-u"
    upper = _upper(n - 1)
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
    m = _random_maps([(0, 0)], n)[(0, 0)]
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
    arrays = _random_maps([(0, 1), (2, 0), (2, 1)], n)
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
    upper = _upper(n - 1)
    np.testing.assert_array_equal(b["c2"].values[0, 1][upper], arrays[(2, 1)][1:, 1:][upper])


def test_legacy_round_trip(tmp_path):
    n = 25
    q_grid, phi_grid = [0.0021, 0.0042], [-30.0, 0.0, 30.0]
    cells = [(iq, ip) for iq in range(2) for ip in range(3)]
    arrays = _random_maps(cells, n, seed=3)
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
    upper = _upper(n - 2)
    for iq, ip in cells:
        got = ds["c2"].values[iq, ip]
        np.testing.assert_array_equal(got[upper], arrays[(iq, ip)][2:, 2:][upper])
        assert np.all(np.isnan(got[~upper]))
    assert open_dataset(path, q=0.0042, phi=[31]).attrs["q_index"] == [1]


def test_legacy_without_avg_stride_uses_exposure(tmp_path):
    arrays = _random_maps([(0, 0)], 10)
    path = write_legacy(tmp_path / "l.hdf", q_grid=[0.002], phi_grid=[0.0], maps=arrays, exposure_period=0.07)
    assert open_dataset(path).attrs["dt"] == pytest.approx(0.07)


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture
def flow_copy(tmp_path):
    dst = tmp_path / "flow.hdf"
    shutil.copy(FLOW, dst)
    dst.chmod(0o644)
    return dst


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


def test_non_square_map(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        del f[f"{MAPS}/c2_00005"]
        f[f"{MAPS}/c2_00005"] = np.zeros((500, 499), np.float32)
    with pytest.raises(InputError, match="c2_00005 is not a square 2-D map"):
        open_dataset(flow_copy, q_index=8)


def test_unequal_map_shapes(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        del f[f"{MAPS}/c2_00005"]
        f[f"{MAPS}/c2_00005"] = np.zeros((400, 400), np.float32)
    with pytest.raises(InputError, match="c2_00005 has shape \\(400, 400\\)"):
        open_dataset(flow_copy)


def test_non_finite_grid(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        f["/xpcs/qmap/dynamic_v_list_dim1"][3] = np.nan
    with pytest.raises(InputError, match="dynamic_v_list_dim1 holds non-finite"):
        open_dataset(flow_copy)


def test_missing_path_and_not_hdf(tmp_path):
    with pytest.raises(InputError, match="nope.hdf: no such file"):
        open_dataset(tmp_path / "nope.hdf")
    text = tmp_path / "text.hdf"
    text.write_text("hello")
    with pytest.raises(InputError, match="text.hdf: not an HDF5 file"):
        open_dataset(text)
    (tmp_path / "somedir").mkdir()
    with pytest.raises(InputError, match="somedir: exists but is not an xpcsfit store"):
        open_dataset(tmp_path / "somedir")


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
    arrays = _random_maps([(0, 0), (0, 1), (1, 0)], 12)
    path = write_aps_u(tmp_path / "m.hdf", q_grid=[0.002, 0.004], phi_grid=[0.0, 90.0], maps=arrays, frame_time=0.1)
    with pytest.raises(InputError, match=r"no two-time map for q=0.004 1/Å \(index 1\), phi=90 deg"):
        open_dataset(path, q_index=1)
    assert open_dataset(path, q_index=1, phi=[0]).attrs["q_index"] == [1]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_c2(tmp_path, bad):
    arrays = _random_maps([(0, 0), (0, 1), (1, 0), (1, 1)], 16)
    arrays[(1, 1)][3, 9] = bad
    arrays[(0, 1)][9, 3] = np.nan  # below the diagonal: ignored
    path = write_aps_u(tmp_path / "nan.hdf", q_grid=[0.002, 0.004], phi_grid=[0.0, 90.0], maps=arrays, frame_time=0.1)
    with pytest.raises(InputError, match=r"nan.hdf: non-finite c2 values .* q=0.004 1/Å, phi=90 deg"):
        open_dataset(path)
    ds = open_dataset(path, q_index=0)  # the bad map is not selected
    assert ds.attrs["q_index"] == [0]
    assert open_dataset(path, frames=(4, 15)).attrs["frames"] == [4, 15]  # bad value left out


def test_check_tile_finite_same_message():
    block = np.ones((2, 4, 4), np.float32)
    block[1, 3, 0] = np.nan  # below the diagonal
    check_tile_finite(block, np.arange(10, 14), np.arange(10, 14), "f.hdf", 0.005, [10.0, 20.0])
    block[1, 1, 1] = np.inf  # diagonal: not fitted
    check_tile_finite(block, np.arange(10, 14), np.arange(10, 14), "f.hdf", 0.005, [10.0, 20.0])
    block[1, 0, 2] = np.nan
    with pytest.raises(InputError) as err:
        check_tile_finite(block, np.arange(10, 14), np.arange(10, 14), "f.hdf", 0.005, [10.0, 20.0])
    assert str(err.value) == "f.hdf: non-finite c2 values above the diagonal at q=0.005 1/Å, phi=20 deg"
    # off-diagonal tile: every element is above the diagonal
    four = np.ones((1, 2, 3, 3), np.float32)
    four[0, 0, 2, 0] = np.nan
    with pytest.raises(InputError, match="q=0.003 1/Å, phi=5 deg"):
        check_tile_finite(four, np.arange(0, 3), np.arange(5, 8), "f.hdf", [0.003], [5.0, 6.0])


def test_validate_finite_uses_chunk_positions(tmp_path):
    arrays = _random_maps([(0, 0)], 50)
    arrays[(0, 0)][30, 41] = np.nan
    path = write_aps_u(tmp_path / "late.hdf", q_grid=[0.002], phi_grid=[7.0], maps=arrays, frame_time=0.1)
    ds = open_dataset(path, frames=(1, 29), tile=8)  # the NaN lies outside the frames
    validate_finite(ds)
    with pytest.raises(InputError, match="late.hdf: non-finite .* phi=7 deg"):
        open_dataset(path, tile=8)  # inside chunk (3, 5) of 8-frame tiles
    i = xr.DataArray(np.arange(29), dims="t1")
    j = xr.DataArray(np.arange(29), dims="t2")
    validate_finite(ds.assign(c2=ds["c2"].where(j > i)))  # NaN on the diagonal is not fitted
    with pytest.raises(InputError, match="phi=7 deg"):
        validate_finite(ds.assign(c2=ds["c2"].where(j != i + 10)))  # NaN just above it


@pytest.mark.parametrize("frame_time", [0.0, -0.1, np.nan])
def test_non_positive_dt_in_file(tmp_path, frame_time):
    arrays = _random_maps([(0, 0)], 10)
    path = write_aps_u(tmp_path / "dt.hdf", q_grid=[0.002], phi_grid=[0.0], maps=arrays, frame_time=frame_time)
    with pytest.raises(InputError, match="dt.hdf: /entry/instrument/detector_1/frame_time = .* not a finite positive"):
        open_dataset(path)
    assert open_dataset(path, dt=0.5).attrs["dt"] == 0.5  # an explicit dt does not need the file's


def test_non_positive_avg_frame_in_file(tmp_path):
    arrays = _random_maps([(0, 0)], 10)
    path = write_aps_u(tmp_path / "a.hdf", q_grid=[0.002], phi_grid=[0.0], maps=arrays, frame_time=0.1, avg_frame=0)
    with pytest.raises(InputError, match="/xpcs/twotime/config/avg_frame = 0.0"):
        open_dataset(path)


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


# --------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_compute_on_local_cluster_process_worker():
    from distributed import Client, LocalCluster

    ds = open_dataset(FLOW, q_index=[4, 8], phi=[33.8, 146.1], frames=(1, 300), tile=128)
    expected = ds["c2"].values  # threaded scheduler, this process
    with LocalCluster(
        n_workers=1, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        got = client.compute(ds["c2"].data).result()
    np.testing.assert_array_equal(got, expected)
