"""End-to-end fits on a LocalCluster: accuracy on the APS files, determinism, API."""

import json
import warnings

import numpy as np
import pytest

import xpcsfit

pytestmark = pytest.mark.slow

TIMES = np.array([5.0, 10.0, 25.0])


def truth(shared_data, name):
    return json.loads((shared_data / f"{name}.truth.json").read_text())["truth"]


def phi0_error(phi0, true):
    # phi0 is defined modulo 180°.
    return abs((phi0 - true + 90.0) % 180.0 - 90.0)


def fit_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xpcsfit.GapWarning)
        return xpcsfit.fit(*args, progress=False, **kwargs)


def test_flow_small_highest_q(shared_data, client):
    tr = truth(shared_data, "flow_small")
    r = fit_quiet(shared_data / "flow_small.hdf", q_index=8, mode="laminar_flow", client=client)
    assert r.converged, r.termination
    assert len(r.names) == 7  # all physics parameters free
    np.testing.assert_array_less(np.abs(r.J(TIMES) / tr["D0"] - 1), 0.10)
    np.testing.assert_array_less(np.abs(r.gamma_dot(TIMES) / tr["gamma_dot_t0"] - 1), 0.10)
    assert phi0_error(r.parameters["phi0"], tr["phi0"]) < 3.0
    # The degenerate pairs are said plainly.
    assert any("D0" in w and "D_offset" in w for w in r.warnings)


def test_flow_small_all_q_jointly(shared_data, client):
    tr = truth(shared_data, "flow_small")
    r = fit_quiet(shared_data / "flow_small.hdf", mode="laminar_flow", client=client)
    assert r.q.size == 3
    assert r.converged, r.termination
    np.testing.assert_array_less(np.abs(r.J(TIMES) / tr["D0"] - 1), 0.15)
    np.testing.assert_array_less(np.abs(r.gamma_dot(TIMES) / tr["gamma_dot_t0"] - 1), 0.10)
    assert phi0_error(r.parameters["phi0"], tr["phi0"]) < 4.0


def test_static_small(shared_data, client):
    tr = truth(shared_data, "static_small")
    r = fit_quiet(shared_data / "static_small.hdf", q_index=8, mode="static", client=client)
    assert r.converged, r.termination
    np.testing.assert_array_less(np.abs(r.J(TIMES) / tr["D0"] - 1), 0.10)


def test_fit_writes_complete_result_directory(small_flow_file, client, tmp_path):
    import xarray as xr

    out = tmp_path / "result"
    r = fit_quiet(small_flow_file, client=client, out=out, gap=2.0e6)
    doc = json.loads((out / "fit.json").read_text())
    for key in ("parameters", "per_angle", "covariance", "chi2", "reduced_chi2", "dof", "converged",
                "termination", "iterations", "data_passes", "wall_time_s", "provenance", "input",
                "transport", "warnings"):
        assert key in doc
    assert set(doc["parameters"]) == set(r.names)
    assert doc["parameters"]["D0"]["unit"] == "Å²/s^(1+alpha)"
    assert doc["input"]["sha256"] and doc["input"]["frames"] == [1, 159]
    assert len(doc["covariance"]["matrix"]) == 7 + 2 * 4
    assert np.all(np.isfinite(doc["per_angle"]["residual_rms"]))
    # The simulation's noise sd is 0.01: the residual rms per bin must find it.
    np.testing.assert_allclose(doc["per_angle"]["residual_rms"], 0.01, rtol=0.05)
    fitted = xr.open_zarr(out / "fitted.zarr")
    assert fitted["c2_fit"].dims == ("q", "phi", "t1", "t2")
    resid = fitted["residual"].values
    assert np.nanstd(resid) == pytest.approx(0.01, rel=0.05)
    # The rms per bin (from the final normal-equation pass) is that of the residual written.
    rms_written = np.sqrt(np.nanmean(resid.astype(float) ** 2, axis=(2, 3)))
    np.testing.assert_allclose(doc["per_angle"]["residual_rms"], rms_written, rtol=1e-5)
    assert np.isnan(resid[0, 0, 5, 2])  # below the diagonal: not fitted
    assert len(list(out.glob("c2_q0_phi*.png"))) == 4 and (out / "transport.png").exists()
    # Noise model and covariance method are recorded; white noise of sd 0.01: sigma finds
    # it, the fit's reduced chi2 is ≈ 1 and no inflation is needed.
    noise = doc["noise"]
    np.testing.assert_allclose(noise["sigma"], 0.01, rtol=0.1)
    assert 0.9 < doc["reduced_chi2"] < 1.1 and "Ribatet" in noise["covariance_method"]
    assert 0.8 < noise["kappa"][0] < 1.6 and not any("misfit" in w for w in doc["warnings"])
    # g2(τ) cuts at a few ages, data and fit, and the residual by lag, beside the maps.
    assert (out / "g2_cuts.png").exists()
    cut, cut_fit = fitted["g2_cut_data"].values, fitted["g2_cut_fit"].values
    assert cut.shape == (1, 4, fitted.sizes["age"], fitted.sizes["lag"]) and fitted.sizes["lag"] == 159
    age0 = 0  # the first age is dataset row 0: its cut is that row of the map from lag 1 on
    np.testing.assert_allclose(cut[0, 1, age0, 1:], fitted["c2_fit"].values[0, 1, 1, 2:] +
                               fitted["residual"].values[0, 1, 1, 2:], atol=1e-6)
    np.testing.assert_allclose(cut_fit[0, 1, age0, 1:], fitted["c2_fit"].values[0, 1, 1, 2:], atol=1e-6)
    assert np.nanmax(np.abs(fitted["residual_by_lag"].values[..., :100])) < 0.01  # ≥ 59 points per lag
    assert not list(tmp_path.glob(".result.partial-*"))


def test_misfit_is_flagged(small_flow_file, client):
    # A static model cannot describe sheared data: its residuals exceed the noise level
    # the data show along their diagonals, and the fit says so.
    r = fit_quiet(small_flow_file, client=client, mode="static")
    assert r.reduced_chi2 > 1.5 and any(w.startswith("model misfit") for w in r.warnings), r.warnings
    right = fit_quiet(small_flow_file, client=client, mode="laminar_flow", gap=2.0e6)
    assert 0.9 < right.reduced_chi2 < 1.1 and not any("misfit" in w for w in right.warnings)
    naive = fit_quiet(small_flow_file, client=client, mode="laminar_flow", gap=2.0e6,
                      config={"covariance": "naive"})
    assert naive.noise["covariance_method"].startswith("naive") and "kappa" not in naive.noise
    np.testing.assert_allclose(naive.x, right.x, rtol=1e-12)


def test_failed_fit_leaves_earlier_result_untouched(small_flow_file, client, tmp_path):
    out = tmp_path / "result"
    fit_quiet(small_flow_file, client=client, out=out)
    before = (out / "fit.json").read_bytes()
    with pytest.raises(xpcsfit.ConfigError):
        fit_quiet(small_flow_file, client=client, out=out, phi=[])
    with pytest.raises(xpcsfit.ConfigError):
        fit_quiet(small_flow_file, client=client, out=out, config={"bounds": {"D0": [5.0, 1.0]}})
    assert (out / "fit.json").read_bytes() == before


def test_fit_runs_as_a_task_with_client_submit(small_flow_file, client):
    future = client.submit(xpcsfit.fit, str(small_flow_file), mode="laminar_flow", gap=2.0e6,
                           progress=False, pure=False)
    r = future.result()
    assert r.converged
    assert r.J(10.0) == pytest.approx(2.0e4, rel=0.05)


def test_gap_default_warns(small_flow_file, client):
    with pytest.warns(xpcsfit.GapWarning) as record:
        xpcsfit.fit(small_flow_file, client=client, progress=False, frames=(1, 60))
    assert record[0].filename == __file__  # the warning names the caller's line


def test_nan_in_c2_is_an_input_error(tmp_path, client):
    from xpcsfit.io.apsu import write_aps_u

    c2 = np.ones((40, 40)) * 1.1
    c2[3, 20] = np.nan
    path = write_aps_u(tmp_path / "nan.hdf", q_grid=[0.005], phi_grid=[10.0],
                       maps={(0, 0): c2}, frame_time=0.1)
    with pytest.raises(xpcsfit.InputError, match="nan.hdf"):
        fit_quiet(path, client=client)


def test_stream_and_hold_fits_agree(small_flow_file, client, tmp_path):
    store, _ = xpcsfit.ingest(small_flow_file, tmp_path / "s.zarr", tile=64)
    held = fit_quiet(store, client=client, config={"memory": "hold"})
    streamed = fit_quiet(store, client=client, config={"memory": "stream"})
    from_hdf = fit_quiet(small_flow_file, client=client, tile=64)
    assert held.engine["storage"] == "hold" and streamed.engine["storage"] == "stream"
    assert held.engine["tile_size"] == 64  # a store's chunk side is the default tile
    np.testing.assert_allclose(streamed.x, held.x, rtol=1e-10, atol=0)
    np.testing.assert_allclose(from_hdf.x, held.x, rtol=1e-10, atol=0)
    # At most one compiled variant per kernel (block sums, costs, model) and tile shape in
    # a fit, and none for a shape a previous fit compiled. "After warm-up" counts from the
    # first normal-equation and cost passes: the model kernel is first run after them (the
    # covariance pass), so the first fit on a worker (held may be) compiles it then.
    for engine in (held.engine, streamed.engine):
        assert all(n <= 3 for n in engine["compilations"].values()), engine["compilations"]
        assert all(n <= 1 for n in engine["compilations_after_warmup"].values())
    assert all(n == 0 for n in streamed.engine["compilations"].values())


def test_frame_selection_on_a_store_keeps_tiles_on_chunks(small_flow_file, client, tmp_path):
    import xarray as xr

    store, _ = xpcsfit.ingest(small_flow_file, tmp_path / "s.zarr", tile=64)
    out = tmp_path / "res"
    r = fit_quiet(store, client=client, frames=(10, 150), out=out)
    # Tiles start at frames 10, 64, 128: three rows of tiles, six tiles in all.
    assert r.engine["n_tiles"] == 6
    fitted = xr.open_zarr(out / "fitted.zarr")
    t = fitted["t1"].values
    assert t[0] == 0.0 and t[-1] == pytest.approx(15.0)  # starts at the aligned frame 0
    resid = fitted["residual"].values[0, 0]
    assert np.isnan(resid[:10]).all()  # frames before the selection are not fitted
    assert np.isfinite(resid[10, 11:151]).all()


def test_gap_recorded_at_ingest_is_used(small_flow_file, client, tmp_path):
    store, _ = xpcsfit.ingest(small_flow_file, tmp_path / "s.zarr", tile=64, gap=1.9e6)
    assert xpcsfit.open_dataset(store).attrs["L"] == 1.9e6
    with warnings.catch_warnings():
        warnings.simplefilter("error", xpcsfit.GapWarning)
        r = xpcsfit.fit(store, client=client, progress=False, frames=(1, 60))
    assert r.input["L"] == 1.9e6 and r.provenance["gap_defaulted"] is False
    assert "gap" not in r.provenance["config"]  # the gap is recorded once: input.L


def test_gpu_cluster_pins_one_card_per_worker():
    # On this CPU machine the workers simply see no card; the spec is what is tested.
    import os

    from distributed import Client

    from xpcsfit.engine.cluster import gpu_cluster

    with gpu_cluster(["0", "1"]) as cluster, Client(cluster) as c:
        seen = c.run(lambda: (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]))
    assert sorted(seen.values()) == [("0", "false"), ("1", "false")]
