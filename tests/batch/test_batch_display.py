"""The progress of a batch run: plain lines with counts and time left off a terminal."""

from __future__ import annotations

from xpcsfit.batch.display import Display


def test_plain_lines_carry_the_counts(capsys):
    d = Display(True, live=False)
    d.start(3)
    d.started()
    d.started()
    d.finished("a.hdf q_index=0", "converged", 1.25)
    d.finished("b.hdf q_index=0", "failed", 0.3, "b.hdf: non-finite c2")
    assert d.eta().startswith("about ") and d.eta().endswith(" s left")
    d.started()
    d.finished("c.hdf q_index=1", "not converged", 2.0, "reached max_iterations=200")
    d.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("xpcsfit batch: [1/3] converged a.hdf q_index=0 in 1.2 s; "
                               "1 running, 1 queued, 1 done, 0 failed; about ")
    assert lines[1].startswith("xpcsfit batch: [2/3] failed b.hdf q_index=0 in 0.3 s: b.hdf: non-finite c2; "
                               "0 running, 1 queued, 1 done, 1 failed")
    assert lines[2] == ("xpcsfit batch: [3/3] not converged c.hdf q_index=1 in 2.0 s: reached max_iterations=200; "
                        "0 running, 0 queued, 2 done, 1 failed")  # nothing left: no estimate


def test_disabled_prints_nothing(capsys):
    d = Display(False)
    d.start(1)
    d.say("x")
    d.started()
    d.finished("a", "converged", 1.0)
    assert capsys.readouterr().out == ""
