"""The xpcsfit command: bad input ends in one line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from xpcsfit.io.apsu import write_aps_u


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "xpcsfit.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("broken")
    c2 = np.full((30, 30), 1.1)
    c2[2, 10] = np.inf
    write_aps_u(d / "inf.hdf", q_grid=[0.005], phi_grid=[10.0], maps={(0, 0): c2}, frame_time=0.1)
    write_aps_u(d / "zero_dt.hdf", q_grid=[0.005], phi_grid=[10.0],
                maps={(0, 0): np.full((30, 30), 1.1)}, frame_time=0.0)
    missing = d / "missing_key.hdf"
    missing.write_bytes((shared_data / "flow_small.hdf").read_bytes())
    with h5py.File(missing, "r+") as f:
        del f["xpcs/twotime/processed_bins"]
    (d / "bad_bounds.yaml").write_text("bounds:\n  D0: [1.0e5, 1.0e2]\n")
    (d / "bad_key.yaml").write_text("initail:\n  D0: 1.0e4\n")
    (d / "bad_initial.yaml").write_text("initial:\n  phi0: 45\n")
    return d


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["{d}/nope.hdf"], 2, ["nope.hdf"]),
        (["{d}/missing_key.hdf"], 2, ["processed_bins"]),
        (["{d}/inf.hdf"], 2, ["inf.hdf", "finite"]),
        (["{d}/zero_dt.hdf"], 2, ["frame_time"]),
        (["{data}/flow_small.hdf", "--dt", "-0.1"], 3, ["dt"]),
        (["{data}/flow_small.hdf", "--q", "0.05"], 3, ["0.05"]),
        (["{data}/flow_small.hdf", "--q-index", "2"], 3, ["2"]),
        (["{data}/flow_small.hdf", "--frames", "0", "100"], 3, ["frame 0"]),
        (["{data}/flow_small.hdf", "--mode", "shear"], 3, ["mode"]),
        (["{data}/flow_small.hdf", "--config", "{d}/bad_bounds.yaml"], 3, ["bad_bounds.yaml", "D0"]),
        (["{data}/flow_small.hdf", "--config", "{d}/bad_key.yaml"], 3, ["initail"]),
        (["{data}/flow_small.hdf", "--config", "{d}/bad_initial.yaml"], 3, ["phi0", "45"]),
        (["{data}/flow_small.hdf", "--config", "{d}/none.yaml"], 3, ["none.yaml"]),
    ],
)
def test_bad_input_one_line_error(args, code, words, broken_files, shared_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"xpcsfit_version": "0.1.0", "files": ["fit.json"], "earlier": True}
    (out / "fit.json").write_text(json.dumps(earlier))  # an earlier xpcsfit result
    args = [a.format(d=broken_files, data=shared_data) for a in args]
    p = run("fit", *args, "--out", out)
    assert p.returncode == code, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xpcsfit: error:"), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0]
    assert json.loads((out / "fit.json").read_text()) == earlier


@pytest.mark.slow
def test_simulate_then_fit_in_process_and_on_a_local_cluster(tmp_path):
    p = run("simulate", "sim.hdf", "--n-frames", "120", "--n-phi", "3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    truth = json.loads((tmp_path / "sim.truth.json").read_text())
    assert truth["truth"]["D0"] == 2.0e4
    # A small selection and no cluster given: in process, said in the first line.
    p = run("fit", "sim.hdf", "--gap", "2e6", "--out", "res", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert "21,063 points" in first and first.endswith("and no cluster or client given)"), first
    assert "; in process (21,063 points ≤ " in first, first
    assert "dashboard" not in p.stdout and "iter" in p.stdout
    doc = json.loads((tmp_path / "res" / "fit.json").read_text())
    assert doc["converged"] and doc["provenance"]["cluster"] == "in process"
    assert doc["parameters"]["phi0"]["value"] == pytest.approx(6.0, abs=1.0)
    # --cluster local forces the cluster; the parameters are the same, bit for bit.
    p = run("fit", "sim.hdf", "--gap", "2e6", "--out", "res_cluster", "--cluster", "local", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].endswith("; on a Dask cluster (a cluster was given)")
    assert "dashboard" in p.stdout
    on_cluster = json.loads((tmp_path / "res_cluster" / "fit.json").read_text())
    assert on_cluster["provenance"]["cluster"].endswith("(2 workers)")
    assert on_cluster["parameters"] == doc["parameters"] and on_cluster["chi2"] == doc["chi2"]


def test_ingest_twice_and_conflict(tmp_path, shared_data):
    store = tmp_path / "flow.zarr"
    p = run("ingest", shared_data / "flow_small.hdf", store)
    assert p.returncode == 0, p.stderr
    p = run("ingest", shared_data / "flow_small.hdf", store)
    assert p.returncode == 0 and "already ingested" in p.stdout
    p = run("ingest", shared_data / "static_small.hdf", store)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
