"""The plan of a batch run (what --dry-run prints): fit or skip each unit, and why."""

from __future__ import annotations

import shutil

import pytest
from batch_helpers import apsu_file, corrupt_apsu, not_hdf5

from xpcsfit.batch.catalogue import Catalogue
from xpcsfit.batch.plan import ERROR, FIT, SKIP, make_plan, result_dir
from xpcsfit.batch.settings import SETTINGS_FILE
from xpcsfit.leastsq.results import FitResult


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    apsu_file(root / "s1" / "a.hdf", q=(0.004, 0.006), n_frames=20)
    apsu_file(root / "s2" / "b.hdf", n_frames=20, seed=1)
    corrupt_apsu(root / "s2" / "broken.hdf")
    not_hdf5(root / "notes.hdf")
    return root


def record(cat, step, status, result=None):
    u = step.unit
    a = cat.begin(input=u.path, sha256=step.sha256, q_index=u.q_index, q=u.q, mode=u.settings.mode,
                  fingerprint=step.fingerprint)
    if status == "failed":
        cat.fail(a, "boom")
    elif status == "done":
        shutil.copytree(result, step.result_dir)
        cat.finish(a, FitResult.from_json(step.result_dir / "fit.json"), step.result_dir)


def test_first_plan_fits_everything(tree, tmp_path):
    plan = make_plan(tree, config={"mode": "static"})
    assert [(s.path.name, s.unit.q_index, s.action, s.why) for s in plan.steps] == [
        ("a.hdf", (0,), FIT, "no result yet"), ("a.hdf", (1,), FIT, "no result yet"),
        ("b.hdf", (0,), FIT, "no result yet")]
    assert plan.steps[1].result_dir == tree / "s1" / "a_q1_fit"
    assert plan.steps[0].sha256 == plan.steps[1].sha256 and plan.steps[0].fingerprint != plan.steps[1].fingerprint
    assert [s.path.name for s in plan.skipped] == ["notes.hdf", "broken.hdf"]
    lines = plan.lines()
    assert lines[0].startswith(f"fit   {tree / 's1' / 'a.hdf'} q_index=0  mode=static  frames=1-19  "
                               '{"mode":"static"}  (no result yet) -> ')
    assert lines[-1] == "3 to fit, 0 done already, 0 with errors, 2 files not two-time results"
    mirrored = make_plan(tree, out_root=tmp_path / "out", force=True)
    assert mirrored.steps[2].result_dir == (tmp_path / "out" / "s2" / "b_q0_fit").resolve()
    assert {s.why for s in mirrored.steps} == {"--force"}
    (joint,) = make_plan(tree / "s1", config={"joint": True}).steps
    assert joint.result_dir.name == "a_q0-1_fit"


def test_bad_settings_are_an_error_step_of_their_files_only(tree):
    (tree / "s1" / SETTINGS_FILE).write_text("q_index: [5]\n")
    plan = make_plan(tree)
    assert [(s.path.name, s.action) for s in plan.steps] == [("a.hdf", ERROR), ("b.hdf", FIT)]
    assert plan.steps[0].why.startswith(f"{tree / 's1' / 'a.hdf'}: settings from {tree / 's1' / SETTINGS_FILE}: q_index 5")
    assert plan.lines()[0] == f"error {tree / 's1' / 'a.hdf'}  ({plan.steps[0].why})"


@pytest.mark.slow  # a stored result comes from the session's small fits on a LocalCluster
def test_reasons_against_the_catalogue(tree, tmp_path, fitted):
    with Catalogue(tmp_path / "xpcsfit.sqlite", write=True) as cat:
        first = make_plan(tree)
        record(cat, first.steps[0], "done", fitted["laminar_flow"])
        record(cat, first.steps[1], "failed")
        cat.begin(input=first.steps[2].path, sha256=first.steps[2].sha256, q_index=[0], q=[0.0055],
                  mode="laminar_flow", fingerprint=first.steps[2].fingerprint)  # still running
        why = [(s.action, s.why) for s in make_plan(tree, catalogue=cat).steps]
        assert why == [(SKIP, "done with the same fingerprint (attempt 1)"), (FIT, "the last attempt failed"),
                       (FIT, "the last attempt did not finish")]
        assert make_plan(tree, catalogue=cat, force=True).steps[0].action == FIT
        # settings changed for s1 only
        (tree / "s1" / SETTINGS_FILE).write_text("gap: 3.0e6\n")
        assert make_plan(tree, catalogue=cat).steps[0].why == "the settings, selection or xpcsfit version changed"
        (tree / "s1" / SETTINGS_FILE).unlink()
        # the result directory removed
        shutil.rmtree(first.steps[0].result_dir)
        assert make_plan(tree, catalogue=cat).steps[0].why == "its result directory is gone or incomplete"
        # the input rewritten
        shutil.copytree(fitted["laminar_flow"], first.steps[0].result_dir)
        apsu_file(tree / "s1" / "a.hdf", q=(0.004, 0.006), n_frames=20, seed=9)
        assert make_plan(tree, catalogue=cat).steps[0].why == "the input changed"


def test_result_dir_beside_input(tree):
    step = make_plan(tree / "s2" / "b.hdf").steps[0]
    assert result_dir(step.unit) == tree / "s2" / "b_q0_fit"
