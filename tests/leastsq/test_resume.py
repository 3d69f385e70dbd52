"""Resumable fits: solver state saved, restored and continued bit for bit; checkpoints
of other fits never used; a fit killed with SIGKILL resumes when rerun."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import xpcsfit
from xpcsfit.io.atomic import atomic_write_text
from xpcsfit.leastsq.checkpoint import Checkpoint, checkpoint_path, digest, fingerprint
from xpcsfit.solver import Termination, TrustRegionLM

from problems import STATIC_2Q

# ---------------------------------------------------------------------------------
# Solver level: in-process evaluator, sums deterministic, so equality is exact.


@pytest.fixture(scope="module")
def static_problem():
    ev = STATIC_2Q.in_process()
    lo, hi = STATIC_2Q.bounds
    x0 = STATIC_2Q.start
    reference = TrustRegionLM(lo, hi).solve(ev, x0)
    assert reference.iteration >= 6, "the problem must take several iterations to test a resume"
    return ev, lo, hi, x0, reference


@pytest.mark.parametrize("stop_after", [1, 4])
def test_restore_through_json_continues_bit_for_bit(static_problem, stop_after):
    ev, lo, hi, x0, reference = static_problem
    solver = TrustRegionLM(lo, hi)
    state = solver.init(ev, x0)
    for _ in range(stop_after):
        state = solver.step(ev, state)
    assert not state.done
    saved = json.loads(json.dumps(state.saved()))
    # A fresh solver, as in a new process: only the JSON carries over.
    passes_before = ev.normal_passes
    resumed = TrustRegionLM(lo, hi).restore(ev, saved)
    assert ev.normal_passes == passes_before + 1  # restoring costs one normal-equations pass
    assert resumed.ne.cost == saved["cost"]
    while not resumed.done:
        resumed = solver.step(ev, resumed)
    assert np.array_equal(resumed.x, reference.x)
    assert resumed.ne.cost == reference.ne.cost
    assert resumed.iteration == reference.iteration
    assert resumed.termination == reference.termination
    assert resumed.converged == reference.converged


def test_restore_of_a_finished_state_needs_no_step(static_problem):
    ev, lo, hi, x0, reference = static_problem
    saved = json.loads(json.dumps(reference.saved()))
    assert saved["termination"] == reference.termination.value
    state = TrustRegionLM(lo, hi).restore(ev, saved)
    assert state.done and state.converged and state.termination is reference.termination
    assert isinstance(state.termination, Termination)
    assert np.array_equal(state.x, reference.x)
    assert state.iteration == reference.iteration


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s.pop("scale"), "scale"),
        (lambda s: s.update(x=s["x"][:-1]), "parameters"),
        (lambda s: s.update(damping=-1.0), "damping"),
        (lambda s: s.update(iteration=2.5), "integers"),
        (lambda s: s.update(x=[1e9] * len(s["x"])), "bounds"),
        (lambda s: s.update(x="abc"), "malformed"),
        (lambda s: s.update(termination="converged"), "termination 'converged'"),
        (lambda s: s.pop("termination"), "termination"),
    ],
)
def test_restore_rejects_a_bad_state_before_any_pass(static_problem, change, words):
    ev, lo, hi, _, reference = static_problem
    saved = json.loads(json.dumps(reference.saved()))
    change(saved)
    passes = ev.normal_passes
    with pytest.raises(ValueError, match=words):
        TrustRegionLM(lo, hi).restore(ev, saved)
    assert ev.normal_passes == passes


# ---------------------------------------------------------------------------------
# The checkpoint file.


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / ".x.checkpoint.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.checkpoint.json"]  # no temporary left
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "missing_dir" / "f", "text")


def _doc(**changes):
    doc = {"input": {"sha256": "a" * 64, "layout": "aps-u"}, "selection": {"q": [0.0055]},
           "mode": "laminar_flow", "gap": 2e6, "tile": 128, "config": {"solver": {"ftol": 1e-8}},
           "start": [1.0, 2.0], "bounds": [[0.0, 0.0], [5.0, 5.0]], "xpcsfit_version": "0.1.0"}
    doc.update(changes)
    return doc


STATE = {"x": [1.5, 2.5], "scale": [1.0, 1.0], "damping": 1e-3, "cost": 1.0, "iteration": 3,
         "normal_passes": 4, "cost_passes": 3, "termination": None}


def test_checkpoint_round_trip_and_removal(tmp_path):
    out = tmp_path / "res"
    ck = Checkpoint(out)
    assert ck.path == tmp_path / ".res.checkpoint.json"
    assert ck.open(_doc(), "in.hdf") == (None, None)  # nothing saved yet: no note
    ck.save(STATE)
    doc = json.loads(ck.path.read_text())
    assert doc["kind"] == "xpcsfit-checkpoint" and doc["xpcsfit_version"] == "0.1.0"
    assert doc["fingerprint"] == digest(_doc())
    assert Checkpoint(out).open(_doc(), "in.hdf") == (STATE, None)
    (tmp_path / ".res.checkpoint.json.tmp-stale").write_text("{")  # a write killed midway
    (tmp_path / "other.json").write_text("{}")
    ck.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"input": {"sha256": "b" * 64, "layout": "aps-u"}}, "input"),
        ({"config": {"solver": {"ftol": 1e-9}}}, "config"),
        ({"selection": {"q": [0.004]}}, "selection"),
        ({"start": [1.0, 2.1]}, "start"),
        ({"xpcsfit_version": "0.2.0"}, "xpcsfit_version"),
    ],
)
def test_checkpoint_of_another_fit_is_not_used(tmp_path, changes, named):
    ck = Checkpoint(tmp_path / "res")
    ck.open(_doc(), "in.hdf")
    ck.save(STATE)
    state, note = Checkpoint(tmp_path / "res").open(_doc(**changes), "in.hdf")
    assert state is None
    assert note == (f"xpcsfit: checkpoint {ck.path} not used: it was saved by a fit with a "
                    f"different {named}; starting over")


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"kind": "xpcsfit-checkpoint", "fingerp', "not valid JSON"),
        ("", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        ('{"kind": "something-else"}', "not an xpcsfit checkpoint"),
        ("[1, 2]", "not an xpcsfit checkpoint"),
        ('{"kind": "xpcsfit-checkpoint", "format": 1}', "checkpoint format 1, this xpcsfit reads 2"),
    ],
)
def test_unreadable_checkpoint_gives_a_note(tmp_path, text, words):
    path = checkpoint_path(tmp_path / "res")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    state, note = Checkpoint(tmp_path / "res").open(_doc(), "in.hdf")
    assert state is None and words in note and str(path) in note
    assert len(note.splitlines()) == 1


def test_resume_false_ignores_the_checkpoint(tmp_path):
    ck = Checkpoint(tmp_path / "res")
    ck.open(_doc(), "in.hdf")
    ck.save(STATE)
    state, note = Checkpoint(tmp_path / "res", resume=False).open(_doc(), "in.hdf")
    assert state is None and "not resuming" in note


# ---------------------------------------------------------------------------------
# End to end: the CLI against a running scheduler, killed with SIGKILL and rerun.

FAR = "gap: 2.0e6\ninitial: {phi0: -5.0}\n"  # truth phi0 = 6: ~15 iterations


@pytest.fixture(scope="module")
def flow_file(tmp_path_factory):
    """laminar_flow, 1 q × 4 phi × 400 frames, all physics parameters determined."""
    from xpcsfit.simulate import simulate

    d = tmp_path_factory.mktemp("resume")
    params = dict(D0=2e4, alpha=0.3, D_offset=3e3, gamma_dot_t0=2e-4, beta=-0.2,
                  gamma_dot_t_offset=2e-5, phi0=6.0)
    path = simulate(d / "flow.hdf", q=(0.0055,), n_phi=4, n_frames=400, noise=0.02, seed=7, params=params)
    (d / "far.yaml").write_text(FAR)
    return path


def _cli(*args):
    return [sys.executable, "-m", "xpcsfit.cli", *map(str, args)]


def _run(*args):
    p = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert "Traceback" not in p.stderr, p.stderr
    return p


def _fit_json(out):
    return json.loads((out / "fit.json").read_text())


def _kill_at_iteration(args, checkpoint, iteration, log):
    """Start the CLI, SIGKILL it once its checkpoint shows ``iteration``; return the
    checkpoint it left (it may have saved one more iteration before the signal landed)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(_cli(*args), stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.exists():
                saved = json.loads(checkpoint.read_text())  # whole: written by os.replace
                if saved["state"]["iteration"] >= iteration:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    return json.loads(checkpoint.read_text())
            time.sleep(0.02)
        raise AssertionError(f"the fit ended or stalled before iteration {iteration}:\n{log.read_text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _common(flow_file, client):
    return [flow_file, "--config", flow_file.parent / "far.yaml", "--scheduler", client.scheduler.address]


@pytest.fixture(scope="module")
def killed(flow_file, client, tmp_path_factory):
    """A CLI fit of flow_file into DIR/res, SIGKILLed at iteration >= 2: (DIR, checkpoint text)."""
    d = tmp_path_factory.mktemp("killed")
    out = d / "res"
    saved = _kill_at_iteration(["fit", *_common(flow_file, client), "--out", out], checkpoint_path(out), 2,
                               d / "killed.log")
    assert saved["state"]["iteration"] >= 2 and not out.exists()
    return d, checkpoint_path(out).read_text()


@pytest.mark.slow
def test_killed_fit_resumes_to_the_uninterrupted_result(flow_file, client, killed, tmp_path):
    common = _common(flow_file, client)
    d, text = killed
    k = json.loads(text)["state"]["iteration"]

    # The uninterrupted reference, which also shows --no-resume: given the killed
    # fit's checkpoint, it starts over.
    full = tmp_path / "full"
    checkpoint_path(full).write_text(text)
    p = _run("fit", *common, "--out", full, "--no-resume")
    assert p.returncode == 0, p.stderr
    assert "not resuming" in p.stdout and "resuming from" not in p.stdout
    ref = _fit_json(full)
    assert ref["resumed_from"] is None
    assert ref["iterations"] >= 5 and 2 <= k < ref["iterations"]
    assert not list(tmp_path.glob(".full.checkpoint.json*"))

    # The same command as the killed one: it continues from the checkpoint.
    out = d / "res"
    ck = checkpoint_path(out)
    assert ck.read_text() == text
    p = _run("fit", *common, "--out", out)
    assert p.returncode == 0, p.stderr
    assert f"resuming from checkpoint {ck}: iteration {k}," in p.stdout
    doc = _fit_json(out)
    np.testing.assert_allclose(_physics(doc), _physics(ref), rtol=1e-8, atol=0)
    np.testing.assert_allclose(doc["per_angle"]["contrast"], ref["per_angle"]["contrast"], rtol=1e-8)
    assert doc["iterations"] == ref["iterations"] and doc["termination"] == ref["termination"]
    assert doc["resumed_from"]["iteration"] == k
    # This run: one pass to rebuild the state at x, then only the remaining iterations.
    assert doc["data_passes"] < ref["data_passes"]
    assert doc["data_passes"] + doc["resumed_from"]["data_passes"] == ref["data_passes"] + 1
    assert not list(d.glob(".res.checkpoint.json*"))  # removed with the result written



def _physics(doc):
    return [v["value"] for v in doc["parameters"].values()]


def test_checkpoint_of_another_input_file_is_not_used(flow_file, tmp_path):
    from xpcsfit.config import load_config
    from xpcsfit.simulate import simulate

    # Two files with the same grid and frames: fingerprints differ by the content alone.
    other = simulate(tmp_path / "flow.hdf", q=(0.0055,), n_phi=4, n_frames=400, noise=0.02, seed=8)
    cfg = load_config(flow_file.parent / "far.yaml")
    x0, lo, hi = np.full(15, 0.5), np.zeros(15), np.ones(15)
    docs = [fingerprint(xpcsfit.open_dataset(f), cfg, 2.0e6, 128, x0, lo, hi) for f in (flow_file, other)]
    ck = Checkpoint(tmp_path / "res")
    ck.open(docs[0], str(flow_file))
    ck.save(STATE)
    state, note = Checkpoint(tmp_path / "res").open(docs[1], str(other))
    assert state is None and note.endswith("saved by a fit with a different input; starting over")
    assert Checkpoint(tmp_path / "res").open(docs[0], str(flow_file)) == (STATE, None)


# ---------------------------------------------------------------------------------
# The driver loop (``xpcsfit.leastsq.driver._solve``) in process: quick, and the paths a cluster run
# rarely takes.


@pytest.fixture(scope="module")
def driver_problem():
    from xpcsfit.config import load_config

    ds = STATIC_2Q.dataset.copy()
    ds.attrs.update(sha256="0" * 64, layout="synthetic", q_index=[0, 1])
    return ds, STATIC_2Q.in_process(), STATIC_2Q.layout, load_config({"mode": "static", "gap": 2.0e6})


class _Killed(Exception):
    """Stands for SIGKILL: raised by a checkpoint after its n-th save."""


class _DyingCheckpoint(Checkpoint):
    def __init__(self, out, saves):
        super().__init__(out)
        self.saves = saves

    def save(self, state):
        super().save(state)
        self.saves -= 1
        if self.saves == 0:
            raise _Killed


def test_driver_resumes_in_process(driver_problem, tmp_path, capsys):
    from xpcsfit.leastsq.driver import _solve

    ds, ev, layout, cfg = driver_problem
    L = 2.0e6
    reference = _solve(ev, ds, cfg, layout, L, 32, False)
    with pytest.raises(_Killed):
        _solve(ev, ds, cfg, layout, L, 32, False, _DyingCheckpoint(tmp_path / "res", 3))
    passes = ev.normal_passes + ev.cost_passes
    r = _solve(ev, ds, cfg, layout, L, 32, True, Checkpoint(tmp_path / "res"))
    assert "resuming from checkpoint" in capsys.readouterr().out
    assert r.resumed_from["iteration"] == 3
    assert np.array_equal(r.x, reference.x) and r.iterations == reference.iterations
    assert np.array_equal(r.covariance, reference.covariance)
    assert ev.normal_passes + ev.cost_passes - passes < reference.data_passes


def test_unwritable_checkpoint_warns_and_the_fit_goes_on(driver_problem, tmp_path, capsys):
    from xpcsfit.leastsq.driver import _solve

    ds, ev, layout, cfg = driver_problem
    blocker = checkpoint_path(tmp_path / "res")
    blocker.mkdir()  # not a file xpcsfit can replace (nor its own: it stays)
    ck = Checkpoint(tmp_path / "res")
    r = _solve(ev, ds, cfg, layout, 2.0e6, 32, True, ck)
    out = capsys.readouterr().out
    assert "not used: cannot read it" in out
    assert out.count("cannot write checkpoint") == 1 and "continues without checkpoints" in out
    assert r.converged
    ck.remove()
    assert blocker.is_dir()


def test_truncated_checkpoint_is_ignored_with_a_note(driver_problem, tmp_path, capsys):
    from xpcsfit.leastsq.driver import _solve

    ds, ev, layout, cfg = driver_problem
    ck = Checkpoint(tmp_path / "res")
    ck.path.write_text('{"kind": "xpcsfit-checkpoint", "format": 2, "fingerprint": "ab')  # cut off
    r = _solve(ev, ds, cfg, layout, 2.0e6, 32, True, ck)
    lines = [line for line in capsys.readouterr().out.splitlines() if "checkpoint" in line]
    assert len(lines) == 1 and "not used: not valid JSON" in lines[0] and lines[0].endswith("starting over")
    assert r.resumed_from is None and r.converged
    assert json.loads(ck.path.read_text())["state"]["iteration"] == r.iterations  # replaced by this fit's
