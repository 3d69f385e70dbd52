"""The result directory: xpcsfit replaces only its own results, refuses the rest up
front, never collides with a concurrent run, and cleans up only what it left itself."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from xpcsfit import cli
from xpcsfit.io.result_dir import (
    PARTIAL_MARKER,
    claim_result_directory,
    is_xpcsfit_result,
)


def run_cli(capsys, *args):
    """xpcsfit's main() in this process (the session's client is the default client)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xpcsfit: error:"), err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def fit_args(small_flow_file):
    return ["fit", small_flow_file, "--gap", "2e6", "--tile", "64"]


def test_user_directory_is_refused_before_any_work(fit_args, client, tmp_path, capsys):
    out = tmp_path / "my_data"
    out.mkdir()
    (out / "notes.txt").write_text("beamtime notes")
    code, stdout, err = run_cli(capsys, *fit_args, "--out", out)
    assert code == 3
    assert_one_line_error(err, str(out), "not an xpcsfit result", "notes.txt")
    assert "xpcsfit: tiles " not in stdout  # refused before the tiles were loaded
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "beamtime notes"
    assert sorted(os.listdir(tmp_path)) == ["my_data"]  # no lock, no partial left beside it


def test_regular_file_is_refused(fit_args, client, tmp_path, capsys):
    out = tmp_path / "result"
    out.write_text("a file of the user's")
    code, _, err = run_cli(capsys, *fit_args, "--out", out)
    assert code == 3
    assert_one_line_error(err, str(out), "not a directory")
    assert out.read_text() == "a file of the user's"
    assert sorted(os.listdir(tmp_path)) == ["result"]


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_unwritable_location_is_refused_before_any_work(where, fit_args, client, tmp_path, capsys):
    # As root (CI) permission bits do not stop writes, so the places are ones nobody can write.
    if where == "under_a_file":
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "result"
    else:
        out = "/proc/xpcsfit-no-such-dir/result"
    code, stdout, err = run_cli(capsys, *fit_args, "--out", out)
    assert code == 3
    assert_one_line_error(err, str(out), "cannot write there")
    assert "xpcsfit: tiles " not in stdout


def test_too_few_frames_is_a_one_line_error(fit_args, client, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, *fit_args, "--frames", "10", "11", "--out", tmp_path / "r")
    assert code == 3
    assert_one_line_error(err, "frames = (10, 11)")
    code, stdout, err = run_cli(capsys, "fit", fit_args[1], "--q-index", "0", "--phi", "22.5",
                                "--frames", "10", "13", "--mode", "laminar_flow", "--out", tmp_path / "r")
    # 4 frames × 1 bin = 6 points for 7 + 2 parameters
    assert code == 3
    assert_one_line_error(err, "6 points cannot determine 9 parameters")
    assert not (tmp_path / "r").exists()


def test_earlier_result_and_empty_directory_are_replaced(fit_args, client, tmp_path, capsys):
    out = tmp_path / "result"
    out.mkdir()  # empty: nothing to lose
    code, _, err = run_cli(capsys, *fit_args, "--out", out)
    assert code == 0, err
    first = json.loads((out / "fit.json").read_text())
    assert first["files"] == sorted(os.listdir(out))
    assert is_xpcsfit_result(out) == (True, "")
    code, _, err = run_cli(capsys, *fit_args, "--frames", "1", "120", "--out", out)
    assert code == 0, err
    second = json.loads((out / "fit.json").read_text())
    assert second["input"]["frames"] == [1, 120] and first["input"]["frames"] == [1, 159]
    assert sorted(os.listdir(tmp_path)) == ["result"]  # the earlier result is gone, nothing beside
    # A user's file put into a result makes it the user's: refused, kept.
    (out / "my_plot.svg").write_text("<svg/>")
    code, _, err = run_cli(capsys, *fit_args, "--out", out)
    assert code == 3
    assert_one_line_error(err, "my_plot.svg")
    assert json.loads((out / "fit.json").read_text()) == second


def test_stale_partials_of_xpcsfit_are_removed_others_kept(fit_args, client, tmp_path, capsys):
    out = tmp_path / "result"
    stale = tmp_path / ".result.partial-dead1234"
    (stale / "fitted.zarr").mkdir(parents=True)
    (stale / PARTIAL_MARKER).write_text("pid 1\n")
    foreign = tmp_path / ".result.partial-users"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not xpcsfit's")
    code, stdout, err = run_cli(capsys, *fit_args, "--out", out)
    assert code == 0, err
    assert "removed .result.partial-dead1234" in stdout
    assert not stale.exists()
    assert (foreign / "keep.txt").read_text() == "not xpcsfit's"
    assert sorted(os.listdir(tmp_path)) == [".result.partial-users", "result"]


def test_a_claimed_output_refuses_a_second_run(fit_args, client, tmp_path, capsys):
    out = tmp_path / "result"
    with claim_result_directory(out) as claim:
        code, stdout, err = run_cli(capsys, *fit_args, "--out", out)
        assert code == 3
        assert_one_line_error(err, str(out), "another xpcsfit run", f"pid {os.getpid()}")
        assert claim.partial.is_dir()
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []  # abandoned claim: all gone


@pytest.mark.slow
def test_two_fits_with_the_same_out_at_once(small_flow_file, client, tmp_path):
    """Two CLI processes: the first writes the result, the second is told so at once."""
    out = tmp_path / "result"
    cmd = [sys.executable, "-m", "xpcsfit.cli", "fit", str(small_flow_file), "--gap", "2e6",
           "--out", str(out), "--scheduler", client.scheduler.address]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".result.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists(), "the first run never claimed its output"
    # The first run is held still while the second starts: a small fit can otherwise end
    # before the second process has imported xpcsfit (it did, once, on a loaded machine).
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 3
    assert_one_line_error(second.stderr, "another xpcsfit run")
    doc = json.loads((out / "fit.json").read_text())
    assert doc["converged"] and is_xpcsfit_result(out) == (True, "")
    assert sorted(os.listdir(tmp_path)) == ["result"]
