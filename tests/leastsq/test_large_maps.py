"""Maps of more than MAX_PIXELS frames: strided reads and the whole ``xpcsfit fit`` path.

Above MAX_PIXELS frames the heatmaps show every s-th frame only (``stride_for``). These
tests fit simulated APS-U files of 1000 and 1037 frames (odd size: the last tile is
partial; strides 4 and 5) through ``xpcsfit.cli.main``, from the HDF5 file and from a store written by
``xpcsfit ingest``, and check every output against the input.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xpcsfit.leastsq.plots as plots
from xpcsfit.cli import main
from xpcsfit.io.apsu import write_aps_u
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.hdf5 import C2Reader, read_info
from xpcsfit.model import c2_model
from xpcsfit.parameters import MODES
from xpcsfit.simulate import phi_grid, simulate

# --------------------------------------------------------------------------- C2Reader

N_READER = 300  # > the writer's 256-frame HDF5 chunks: selections cross chunk edges
FIRST = 3  # the reader's index 0 is frame 3: offsets must be applied once


@pytest.fixture(scope="module")
def reader_file(tmp_path_factory):
    """2 q × 3 phi random maps; returns (reader, expected (2, 3, n, n) with NaN below)."""
    rng = np.random.default_rng(7)
    maps = {(iq, ip): rng.random((N_READER, N_READER)).astype(np.float32)
            for iq in range(2) for ip in range(3)}
    path = write_aps_u(tmp_path_factory.mktemp("reader") / "r.hdf", q_grid=[0.002, 0.004],
                       phi_grid=[0.0, 60.0, 120.0], maps=maps, frame_time=0.1)
    info = read_info(path)
    keys = [[info.maps[(iq, ip)] for ip in range(3)] for iq in range(2)]
    reader = C2Reader(path, keys, (FIRST, N_READER - 1))
    n = N_READER - FIRST
    upper = np.triu(np.ones((n, n), bool))  # diagonal kept: the reader does not drop it
    expected = np.stack([np.stack([np.where(upper, maps[(iq, ip)][FIRST:, FIRST:], np.nan)
                                   for ip in range(3)]) for iq in range(2)])
    return reader, expected


@pytest.mark.parametrize("key", [
    (slice(None), slice(None), slice(None, None, 2), slice(None, None, 2)),  # the heatmap's read
    (0, 1, slice(100, 200, 3), slice(150, 260, 7)),        # crosses the diagonal
    (slice(None), slice(None), slice(10, 290, 5), slice(0, 50, 4)),  # mostly below the diagonal
    (1, 2, slice(200, 280, 3), slice(0, 100, 2)),          # wholly below: NaN, not read
    (slice(None, None, 2), slice(1, None, 2), slice(250, 297, 9), slice(5, 297, 11)),
    (slice(1, 2), 0, slice(-50, None, 4), slice(-60, -3, 13)),  # negative bounds
    (0, 0, slice(40, 40, 2), slice(None, None, 3)),        # empty rows
    (0, slice(None), 7, slice(3, 200, 6)),                  # one row, strided columns
    (0, 0, slice(0, 297, 500), slice(0, 297, 296)),         # step longer than the axis
    (1, 1, slice(250, 260), slice(240, 297)),               # unit steps still right
])
def test_reader_strided_slices_match_numpy(reader_file, key):
    reader, expected = reader_file
    got = reader[key]
    want = expected[key]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reader_random_strided_blocks_match_numpy(reader_file, data):
    reader, expected = reader_file
    key = []
    for n in expected.shape:
        start = data.draw(st.integers(-n - 2, n + 2))
        stop = data.draw(st.one_of(st.none(), st.integers(-n - 2, n + 2)))
        key.append(slice(start, stop, data.draw(st.integers(1, n + 3))))
    key = tuple(key)
    np.testing.assert_array_equal(reader[key], expected[key])


def test_reader_refuses_non_positive_steps(reader_file):
    reader, _ = reader_file
    with pytest.raises(IndexError, match="positive-step"):
        reader[0, 0, ::-1]
    with pytest.raises(IndexError, match="ints and slices"):
        reader[0, 0, [1, 2]]


def test_strided_dask_read_of_an_hdf_dataset(reader_file):
    # the failure of the issue: a strided slice of the dask array reaches the reader
    reader, expected = reader_file
    ds = open_dataset(reader.path, frames=(FIRST, N_READER - 1), tile=64)
    got = ds["c2"].data[1, 2, ::3, 1::3].compute()
    np.testing.assert_array_equal(got, expected[1, 2, ::3, 1::3])


# --------------------------------------------------------------------------- the whole CLI path

NOISE = 0.02
CASES = {  # n_frames: (n_phi, tile)
    1000: (3, 256),
    1037: (3, 256),
}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """{n_frames: (hdf path, store path)}; the stores written by ``xpcsfit ingest``."""
    d = tmp_path_factory.mktemp("large")
    files = {}
    for n, (n_phi, tile) in CASES.items():
        path = simulate(d / f"sim{n}.hdf", q=(0.0055,), n_phi=n_phi, n_frames=n, noise=NOISE, seed=n)
        store = d / f"sim{n}.zarr"
        assert main(["ingest", str(path), str(store), "--tile", str(tile), "--gap", "2e6"]) == 0
        files[n] = (path, store)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hdf", "store"])
@pytest.mark.parametrize("n_frames", sorted(CASES))
def test_fit_cli_writes_every_output_of_a_large_map(n_frames, source, simulated, client, tmp_path,
                                                    monkeypatch):
    n_phi, tile = CASES[n_frames]
    hdf, store = simulated[n_frames]
    pictures = {}
    draw = plots.heatmap_pngs

    def record(paths, t, data, fitted, titles):
        pictures.update({p.name: (t, d, f) for p, d, f in zip(paths, data, fitted, strict=True)})
        draw(paths, t, data, fitted, titles)

    monkeypatch.setattr(plots, "heatmap_pngs", record)
    out = tmp_path / "res"
    args = ["fit", str(hdf if source == "hdf" else store), "--out", str(out),
            "--scheduler", client.scheduler.address]
    if source == "hdf":  # a store keeps its chunk side and the gap given at ingest
        args += ["--tile", str(tile), "--gap", "2e6"]
    assert main(args) == 0  # 0: converged and written

    doc = json.loads((out / "fit.json").read_text())
    assert doc["converged"] and doc["input"]["frames"] == [1, n_frames - 1]
    assert doc["engine"]["tile_size"] == tile
    n = n_frames - 1
    assert doc["input"]["n_points"] == n_phi * n * (n - 1) // 2

    with h5py.File(hdf, "r") as f:
        names = sorted(f["/xpcs/twotime/correlation_map"])
        c2 = np.stack([f["/xpcs/twotime/correlation_map"][k][()] for k in names])  # (n_phi, T, T)

    # fitted.zarr: frames 0 … T-1 (the fit starts at frame 1, and 1 % tile = 1 leading frame)
    fz = xr.open_zarr(out / "fitted.zarr", consolidated=False)
    assert fz["c2_fit"].dims == ("q", "phi", "t1", "t2")
    assert fz["c2_fit"].shape == fz["residual"].shape == (1, n_phi, n_frames, n_frames)
    assert fz["c2_fit"].encoding["chunks"] == (1, n_phi, tile, tile)
    np.testing.assert_allclose(fz["t1"].values, np.arange(n_frames) * 0.1, rtol=1e-12)
    np.testing.assert_array_equal(fz["t2"].values, fz["t1"].values)
    np.testing.assert_allclose(fz["q"].values, [0.0055])
    np.testing.assert_allclose(fz["phi"].values, phi_grid(n_phi))
    fit = fz["c2_fit"].values[0]
    resid = fz["residual"].values[0]
    i, j = np.indices((n_frames, n_frames))
    fitted = (j > i) & (i >= 1)
    assert np.array_equal(np.isfinite(fit), np.broadcast_to(fitted, fit.shape))
    assert np.array_equal(np.isfinite(resid), np.broadcast_to(fitted, fit.shape))
    # data = model + residual where fitted, up to float32 rounding of values near 1
    np.testing.assert_allclose((fit + resid)[:, fitted], c2[:, fitted], atol=2e-6)
    # The noise is iid Gaussian with sd NOISE and each bin has ~5e5 points: the residual
    # rms has a relative sd of 1/sqrt(2N) ≈ 0.1 %, so a fit at the truth is within 2 %.
    rms = np.sqrt(np.nanmean(resid ** 2, axis=(1, 2)))
    np.testing.assert_allclose(rms, NOISE, rtol=0.02)
    np.testing.assert_allclose(doc["per_angle"]["residual_rms"][0], rms, rtol=1e-4)

    # c2_fit is the model at the reported parameters, also in the last (partial) tile
    theta = [doc["parameters"][k]["value"] for k in MODES["laminar_flow"]]
    rows = np.arange(n_frames - 60, n_frames - 1)
    t = fz["t1"].values
    want = np.asarray(c2_model(np.array(theta), np.array(doc["per_angle"]["contrast"][0]),
                               np.array(doc["per_angle"]["offset"][0]), "laminar_flow", 0.0055,
                               doc["input"]["L"], np.asarray(doc["per_angle"]["phi"]), t[rows], t))
    sub = fitted[rows]
    np.testing.assert_allclose(fit[:, rows][:, sub], want[:, sub], rtol=1e-6)

    # every picture exists and shows the data and the model at every s-th frame
    assert (out / "transport.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = plots.stride_for(n)
    assert s == -(-n // plots.MAX_PIXELS) > 1
    assert sorted(pictures) == sorted(f"c2_q0_phi{ip}.png" for ip in range(n_phi))
    upper = np.triu(np.ones((n, n), bool), 1)[::s, ::s]
    for ip in range(n_phi):
        assert (out / f"c2_q0_phi{ip}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        t_pic, data, model = pictures[f"c2_q0_phi{ip}.png"]
        assert data.shape == model.shape == (len(range(0, n, s)),) * 2
        np.testing.assert_allclose(t_pic, t[1::s])
        np.testing.assert_array_equal(data[upper], c2[ip, 1:, 1:][::s, ::s][upper])
        np.testing.assert_array_equal(model[upper], fit[ip, 1:, 1:][::s, ::s][upper])
        assert np.isnan(data[~upper]).all() and np.isnan(model[~upper]).all()
