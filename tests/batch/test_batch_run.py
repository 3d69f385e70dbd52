"""The batch runner end to end: runs over a tree, reruns, changes, bad files, the CLI,
the catalogue's rows and queries, the report's table, a batch submitted as a task.

Fits are real, on the session's LocalCluster: small simulated files (2 phi × 40 frames;
at 24 frames the q = 0.004 fit is not determined well enough to converge) with seeds
whose fits converge in about ten iterations (a few need over a hundred at this size).
"""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pytest
from batch_helpers import apsu_file, corrupt_apsu, not_hdf5
from test_batch_report import parse

import xpcsfit
from xpcsfit.batch.catalogue import Catalogue
from xpcsfit.batch.query import results_text
from xpcsfit.batch.run import CATALOGUE_FILE, REPORT_FILE, batch, catalogue_path, fit_unit
from xpcsfit.batch.settings import SETTINGS_FILE
from xpcsfit.cli import main
from xpcsfit.errors import EXIT_INCOMPLETE
from xpcsfit.io.result_dir import is_xpcsfit_result
from xpcsfit.parameters import GapWarning

pytestmark = pytest.mark.slow  # real fits on the session's LocalCluster
N_FRAMES = 40


def nan_file(path):
    """A structurally valid APS-U file with a NaN in one map: discovery finds it, the fit refuses it."""
    apsu_file(path, n_frames=N_FRAMES, seed=7)
    with h5py.File(path, "a") as f:
        data = f["/xpcs/twotime/correlation_map/c2_00001"]
        values = data[()]
        values[3, 5] = np.nan
        data[...] = values
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    apsu_file(root / "s1" / "a.hdf", q=(0.004, 0.006), n_frames=N_FRAMES, seed=1)
    apsu_file(root / "s2" / "b.hdf", n_frames=N_FRAMES, seed=5)
    (root / SETTINGS_FILE).write_text("gap: 2.0e6\n")
    return root


def attempts(cat_path, **where):
    with Catalogue(cat_path) as cat:
        rows = cat.attempts()
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def test_reruns_do_only_what_changed(tree, tmp_path, client):
    out = tmp_path / "results"
    first = batch(tree, out_root=out, client=client, progress=False)
    cat = out / CATALOGUE_FILE
    assert first.exit_code == 0 and first.catalogue == cat and first.report == out / REPORT_FILE
    assert [(u.label.split("/")[-1], u.status) for u in first.units] == [
        ("a.hdf q_index=0", "converged"), ("a.hdf q_index=1", "converged"), ("b.hdf q_index=0", "converged")]
    dirs = [u.result_dir for u in first.units]
    assert dirs == [out / "s1" / "a_q0_fit", out / "s1" / "a_q1_fit", out / "s2" / "b_q0_fit"]
    for d in dirs:  # fit directories exactly as `xpcsfit fit` writes them, fitted whole in a worker task
        assert is_xpcsfit_result(d) == (True, "")
        assert {"fit.json", "transport.png"} <= {p.name for p in d.iterdir()}
        assert json.loads((d / "fit.json").read_text())["provenance"]["cluster"] == "in process"

    again = batch(tree, out_root=out, client=client, progress=False)
    assert again.exit_code == 0 and {u.status for u in again.units} == {"done already"}
    assert len(attempts(cat)) == 3

    apsu_file(tree / "s2" / "b.hdf", n_frames=N_FRAMES, seed=13)  # one input rewritten: only its unit
    changed = batch(tree, out_root=out, client=client, progress=False)
    assert [u.status for u in changed.units] == ["done already", "done already", "converged"]
    assert len(attempts(cat)) == 4 and len(attempts(cat, input=str(tree / "s2" / "b.hdf"))) == 2

    # s1's xpcsfit.yaml: only s1's units, here with their tiles fanned out over the workers
    # (in_process_max_points is where a fit runs, not what it is: the gap makes the change),
    # by a batch that runs itself as a task, as from a notebook (it uses the worker's client)
    (tree / "s1" / SETTINGS_FILE).write_text("gap: 3.0e6\nin_process_max_points: 0\n")
    in_task = client.submit(xpcsfit.batch, str(tree), out_root=str(out), progress=False, pure=False).result()
    assert [u.status for u in in_task.units] == ["converged", "converged", "done already"]
    assert len(attempts(cat)) == 6
    for d in dirs[:2]:
        fit_json = json.loads((d / "fit.json").read_text())
        assert fit_json["input"]["L"] == 3.0e6
        assert fit_json["provenance"]["cluster"] != "in process"

    # the catalogue's rows and queries
    with Catalogue(cat) as c:
        rows = c.results()
        assert [(r["q_index"], r["attempt"]) for r in rows] == [("0", 5), ("1", 6), ("0", 4)]
        assert all(r["converged"] == 1 and r["result_path"] == str(d) for r, d in zip(rows, dirs))
        assert [r["status"] for r in c.attempts()] == ["done"] * 6
        assert c.attempts("id = 2")[0]["q"] == pytest.approx(0.006)
    frame = xpcsfit.catalogue(cat, where="q < 0.005")
    assert list(frame["q_index"]) == ["0"] and frame["input"][0] == str(tree / "s1" / "a.hdf")
    text = results_text(cat, "input LIKE '%b.hdf'", "csv").splitlines()
    assert len(text) == 2 and text[1].startswith(str(tree / "s2" / "b.hdf"))

    # the report: a row per unit, linking its directory and thumbnail
    header, table = parse(out / REPORT_FILE)
    assert [r["class"] for r in table] == ["converged"] * 3
    assert [dict(zip(header, r["cells"]))["input"] for r in table] == ["../data/s1/a.hdf", "../data/s1/a.hdf",
                                                                       "../data/s2/b.hdf"]
    assert table[2]["links"][0] == "s2/b_q0_fit/" and table[2]["images"] == ["s2/b_q0_fit/transport.png"]


def test_bad_files_are_reported_and_the_others_fitted(tree, client, capsys):
    bad = tree / "bad"
    corrupt_apsu(bad / "broken.hdf")
    not_hdf5(bad / "notes.hdf")
    nan_file(bad / "holes.hdf")
    (tree / "s2" / SETTINGS_FILE).write_text("q_index: [4]\n")  # b.hdf has one q
    summary = batch(tree, client=client)
    assert summary.exit_code == EXIT_INCOMPLETE and summary.catalogue == tree / CATALOGUE_FILE
    status = {u.label.removeprefix(str(tree) + "/"): (u.status, u.why) for u in summary.units}
    assert status["s1/a.hdf q_index=0"][0] == status["s1/a.hdf q_index=1"][0] == "converged"
    assert status["bad/holes.hdf q_index=0"][0] == "failed"
    assert "holes.hdf" in status["bad/holes.hdf q_index=0"][1] and "non-finite c2" in status["bad/holes.hdf q_index=0"][1]
    assert status["bad/broken.hdf"] == ("not fitted", "missing key /xpcs/twotime/processed_bins")
    assert status["bad/notes.hdf"] == ("not a result", "not an HDF5 file")
    assert status["s2/b.hdf"][0] == "not fitted" and "q_index 4 has no two-time maps" in status["s2/b.hdf"][1]
    (failed,) = attempts(summary.catalogue, status="failed")
    assert failed["error"] == status["bad/holes.hdf q_index=0"][1] and "\n" not in failed["error"]
    printed = capsys.readouterr().out
    assert "not a result: " + str(bad / "notes.hdf") in printed and "failed " + str(bad / "holes.hdf") in printed
    # the report: fits in the first table, the files without a fit in the second
    header, rows = parse(summary.report)
    assert [r["class"] for r in rows] == ["failed", "converged", "converged", *["not-fitted"] * 3]
    assert {r["cells"][0] for r in rows[3:]} == {"bad/broken.hdf", "bad/notes.hdf", "s2/b.hdf"}
    # bad setting fixed, the damaged and the foreign file left: still incomplete
    (tree / "s2" / SETTINGS_FILE).unlink()
    (bad / "holes.hdf").unlink()
    assert batch(tree, client=client, progress=False).exit_code == EXIT_INCOMPLETE
    (bad / "broken.hdf").unlink()
    final = batch(tree, client=client, progress=False)
    assert final.exit_code == 0 and final.counts == {"done already": 3, "not a result": 1}


def test_cli_dry_run_and_options(tree, capsys):
    assert main(["batch", str(tree), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"fit   {tree / 's1' / 'a.hdf'} q_index=0  mode=laminar_flow")
    assert lines[-1] == "3 to fit, 0 done already, 0 with errors, 0 files not two-time results"
    assert not (tree / CATALOGUE_FILE).exists()  # a dry run writes nothing
    assert main(["batch", str(tree), "--settle", "3"]) == 3
    assert capsys.readouterr().err == "xpcsfit: error: --settle and --poll go with --watch\n"
    assert main(["batch", str(tree / "nowhere")]) == 2
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    (tree / SETTINGS_FILE).write_text("gap: [1\n")
    assert main(["batch", str(tree), "--config", str(tree / "missing.yaml")]) == 3
    with pytest.raises(SystemExit) as info:
        main(["batch", str(tree), "--scheduler", "tcp://x:1", "--cluster", "local"])
    assert info.value.code == 2
    assert catalogue_path([tree / "s1" / "a.hdf"]) == tree / "s1" / CATALOGUE_FILE


def test_a_defaulted_gap_is_said_once_a_run(tmp_path, client, capsys, small_flow_file):
    # Two laminar_flow files and no gap setting: one line for the run from the driver,
    # not a Python warning per unit in the workers' logs; fit.json marks each fit.
    root = tmp_path / "data"
    apsu_file(root / "a.hdf", n_frames=N_FRAMES, seed=5)
    apsu_file(root / "b.hdf", n_frames=N_FRAMES, seed=5)
    summary = batch(root, client=client)
    printed = capsys.readouterr().out
    assert printed.count("gap L not given") == 1 and "set gap: in an xpcsfit.yaml" in printed
    dirs = [u.result_dir for u in summary.units]
    assert len(dirs) == 2 and all(json.loads((d / "fit.json").read_text())["provenance"]["gap_defaulted"]
                                  for d in dirs)
    # the worker task itself lets no GapWarning out (other warnings pass)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fit_unit(str(small_flow_file), progress=False, in_process=True)
    assert result.provenance["gap_defaulted"]
    assert not [w for w in seen if issubclass(w.category, GapWarning)]
