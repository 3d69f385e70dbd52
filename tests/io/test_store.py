"""The Zarr v3 store: ingest, re-ingest, refusal, crash safety, open_dataset on it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io import store as _store
from xpcsfit.io.apsu import write_aps_u
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.store import ingest

from io_helpers import FLOW, STATIC


@pytest.fixture(scope="module")
def flow_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "flow.zarr"
    result = ingest(FLOW, store, tile=128)
    assert result == (store.resolve(), True)
    return store


def test_open_zarr_with_xarray(flow_store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. xarray's "no consolidated metadata" fallback
        ds = xr.open_zarr(flow_store)
    c2 = ds["c2"]
    assert c2.dims == ("q", "phi", "t1", "t2")
    assert c2.shape == (3, 8, 500, 500)
    assert c2.dtype == np.float32
    assert c2.data.chunksize == (1, 8, 128, 128)
    np.testing.assert_allclose(ds["q"].values, [0.001621, 0.003001, 0.005555], rtol=2e-4)
    assert ds["t1"].values[0] == 0.0 and ds["t2"].values[-1] == pytest.approx(49.9)
    assert ds["q"].attrs["units"] == "1/Å" and ds["t1"].attrs["units"] == "s"
    a = ds.attrs
    assert a["dt"] == pytest.approx(0.1)
    assert a["source"] == str(FLOW.resolve())
    assert a["layout"] == "aps-u" and a["n_frames"] == 500 and a["tile"] == 128
    assert a["q_index"] == [0, 4, 8]
    # lower tiles are NaN (fill value), diagonal tiles NaN below the diagonal only
    block = c2[2, 3, :256, :256].values
    assert np.all(np.isnan(block[128:, :128]))
    assert np.all(np.isfinite(np.triu(block)[np.triu_indices(256)]))
    assert np.all(np.isnan(block[np.tril_indices(256, -1)]))


def test_lower_tiles_never_written(flow_store):
    chunk_dir = flow_store / "c2" / "c"
    keys = {tuple(int(p) for p in f.relative_to(chunk_dir).parts) for f in chunk_dir.rglob("*") if f.is_file()}
    expected = {(q, 0, i, j) for q in range(3) for i in range(4) for j in range(i, 4)}
    assert keys == expected  # 10 tiles per q out of 16


def test_reingest_is_a_no_op(flow_store, monkeypatch):
    meta = [flow_store / "zarr.json", flow_store / "c2" / "zarr.json"]
    before = [p.stat().st_mtime_ns for p in meta]

    def must_not_write(*args, **kwargs):
        raise AssertionError("re-ingest wrote a store")

    monkeypatch.setattr(_store, "_write_store", must_not_write)
    assert ingest(FLOW, flow_store, tile=64) == (flow_store.resolve(), False)
    assert [p.stat().st_mtime_ns for p in meta] == before
    assert not list(flow_store.parent.glob("*.partial-*"))


def test_different_input_refused(flow_store):
    with pytest.raises(InputError, match=r"flow.zarr: already holds .*flow_small.hdf \(sha256 [0-9a-f]+…\); choose another store path"):
        ingest(STATIC, flow_store)


def test_existing_non_store_refused(tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="busy: exists but is not an xpcsfit store"):
        ingest(FLOW, target)
    assert (target / "notes.txt").read_text() == "mine"


def test_store_matches_hdf(flow_store):
    a = open_dataset(FLOW, q_index=8)
    b = open_dataset(flow_store, q_index=8)
    assert b["c2"].shape == (1, 8, 499, 499) and b["c2"].dtype == np.float32
    np.testing.assert_array_equal(a["c2"].values, b["c2"].values)  # NaN positions equal too
    for name in ("q", "phi", "t1", "t2"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    for key in ("dt", "frames", "n_frames", "source", "sha256", "layout", "q_index"):
        assert a.attrs[key] == b.attrs[key], key
    assert b.attrs["store"] == str(flow_store.resolve())


def test_store_selection_semantics(flow_store):
    assert open_dataset(flow_store, q=0.0030).attrs["q_index"] == [4]
    assert open_dataset(flow_store).attrs["q_index"] == [0, 4, 8]
    sub = open_dataset(flow_store, q_index=4, phi=[146, 33.8], frames=(10, 200), dt=0.2)
    ref = open_dataset(FLOW, q_index=4, phi=[146, 33.8], frames=(10, 200), dt=0.2)
    assert sub["t1"].values[0] == pytest.approx(2.0)
    np.testing.assert_array_equal(sub["c2"].values, ref["c2"].values)
    np.testing.assert_array_equal(sub["phi"].values, ref["phi"].values)
    with pytest.raises(ConfigError, match=r"q_index = 3 .*indices with maps: \[0, 4, 8\]"):
        open_dataset(flow_store, q_index=3)
    with pytest.raises(ConfigError, match="q_index = 9: out of range"):
        open_dataset(flow_store, q_index=9)
    with pytest.raises(ConfigError, match="frame 0 sits at t = 0"):
        open_dataset(flow_store, frames=(0, 20))


def test_store_keeps_missing_maps_missing(tmp_path):
    rng = np.random.default_rng(1)
    maps = {cell: rng.random((20, 20)).astype(np.float32) + 1 for cell in [(0, 0), (0, 1), (2, 1)]}
    src = write_aps_u(tmp_path / "m.hdf", q_grid=[0.002, 0.003, 0.004], phi_grid=[0.0, 90.0],
                      maps=maps, frame_time=0.05)
    store = ingest(src, tmp_path / "m.zarr", tile=8).path
    ds = xr.open_zarr(store)
    assert ds.attrs["q_index"] == [0, 2]
    assert np.all(np.isnan(ds["c2"].values[1, 0]))  # (q 2, phi 0) has no map
    with pytest.raises(InputError, match=r"no two-time map for q=0.004 1/Å \(index 2\), phi=0 deg"):
        open_dataset(store, q_index=2)
    got = open_dataset(store, q_index=2, phi=[90])["c2"].values[0, 0]
    upper = np.triu(np.ones((19, 19), bool))
    np.testing.assert_array_equal(got[upper], maps[(2, 1)][1:, 1:][upper])


def test_failed_ingest_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = _store._write_band

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(_store, "_write_band", failing)
    store = tmp_path / "crash.zarr"
    with pytest.raises(RuntimeError, match="simulated"):
        ingest(FLOW, store, tile=128)
    assert len(calls) == 3
    assert not store.exists()
    assert list(tmp_path.iterdir()) == []  # no partial left behind either
    monkeypatch.setattr(_store, "_write_band", real)
    assert ingest(FLOW, store, tile=256).created


def test_ingest_bad_tile_and_missing_source(tmp_path):
    with pytest.raises(ConfigError, match="tile = 0"):
        ingest(FLOW, tmp_path / "s", tile=0)
    with pytest.raises(InputError, match="missing.hdf: no such file"):
        ingest(tmp_path / "missing.hdf", tmp_path / "s")
    assert not (tmp_path / "s").exists()
