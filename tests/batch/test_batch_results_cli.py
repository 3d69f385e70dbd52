"""`xpcsfit results`: the catalogue as a table, CSV or JSON; one-line errors."""

from __future__ import annotations

import csv
import io
import json

import pytest

from xpcsfit.batch.catalogue import Catalogue
from xpcsfit.batch.query import TABLE_COLUMNS
from xpcsfit.cli import main
from xpcsfit.leastsq.results import FitResult

pytestmark = pytest.mark.slow  # the rows come from the session's two small fits on a LocalCluster


@pytest.fixture(scope="module")
def db(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "xpcsfit.sqlite"
    with Catalogue(path, write=True) as cat:
        for i, mode in enumerate(("laminar_flow", "static")):
            a = cat.begin(input=f"/data/run{i}.hdf", sha256="0" * 64, q_index=[i], q=[0.005], mode=mode,
                          fingerprint="f")
            cat.finish(a, FitResult.from_json(fitted[mode] / "fit.json"), fitted[mode])
    return path


def run(capsys, *argv):
    code = main(["results", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_table(db, capsys):
    code, out, _ = run(capsys, db)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == list(TABLE_COLUMNS) and len(lines) == 3
    assert lines[1].split()[:4] == ["run0.hdf", "0", "laminar_flow", "yes"]
    assert lines[2].split()[7:9] == ["-", "-"]  # no shear rate in static mode
    assert run(capsys, db, "--where", "mode = 'nope'")[1] == "no results\n"


def test_csv_and_json_hold_every_column(db, capsys):
    _, out, _ = run(capsys, db, "--format", "csv", "--where", "mode = 'static'")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["mode"] == "static" and json.loads(row["warnings"]) and row["gamma_dot_t0"] == ""
    _, out, _ = run(capsys, db, "--format", "json")
    rows = json.loads(out)
    assert [r["input"] for r in rows] == ["/data/run0.hdf", "/data/run1.hdf"] and "J_stderr_middle" in rows[0]


def test_errors_are_one_line(db, tmp_path, capsys):
    code, _, err = run(capsys, db, "--where", "nope >")
    assert code == 3 and err.startswith("xpcsfit: error: where 'nope >': not a valid condition") and err.count("\n") == 1
    code, _, err = run(capsys, tmp_path / "none.sqlite")
    assert code == 2 and err == f"xpcsfit: error: {tmp_path / 'none.sqlite'}: no such catalogue\n"
