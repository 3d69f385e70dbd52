"""The SQLite results catalogue: attempts, current results, schema migration, queries."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from xpcsfit.batch import catalogue as catmod
from xpcsfit.batch.catalogue import SCHEMA_VERSION, Catalogue, catalogue
from xpcsfit.errors import ConfigError, InputError, XpcsfitError
from xpcsfit.leastsq.results import FitResult

UNIT = dict(input="/data/a.hdf", sha256="ab" * 32, q_index=[0], q=[0.0055], mode="laminar_flow", fingerprint="f1")


@pytest.fixture(scope="module")
def results(fitted):
    return {mode: FitResult.from_json(d / "fit.json") for mode, d in fitted.items()}


@pytest.mark.slow  # the session's two small fits on a LocalCluster
def test_attempt_lifecycle_and_current_result(tmp_path, results, fitted):
    path = tmp_path / "cat" / "xpcsfit.sqlite"
    r = results["laminar_flow"]
    with Catalogue(path, write=True) as cat:
        a = cat.begin(**UNIT)
        assert cat.attempts()[0]["status"] == "running" and cat.complete("/data/a.hdf", [0], "f1") is None
        cat.finish(a, r, fitted["laminar_flow"])
        row = cat.complete("/data/a.hdf", (0,), "f1")
        assert cat.complete("/data/a.hdf", [0], "f2") is None
        b = cat.begin(**{**UNIT, "fingerprint": "f2"})
        cat.fail(b, "a.hdf: c2 holds NaN\nat (3, 4)")
    assert row["attempt"] == a and row["q"] == 0.0055 and row["q_values"] == [0.0055]
    for name, value, err in zip(r.names, r.values, r.stderr):
        assert row[name] == pytest.approx(value) and row[f"{name}_stderr"] == pytest.approx(err)
    t = r.transport["t"]
    assert (row["t_start"], row["t_end"]) == (pytest.approx(t[0]), pytest.approx(t[-1]))
    assert row["t_middle"] == pytest.approx((t[0] + t[-1]) / 2)
    assert row["J_start"] == pytest.approx(r.J(t[0])) and row["J_end"] == pytest.approx(r.J(t[-1]))
    assert row["gamma_dot_middle"] == pytest.approx(r.gamma_dot((t[0] + t[-1]) / 2))
    # the band at the window's ends is the one fit.json holds there
    assert row["J_stderr_start"] == pytest.approx(r.transport["J_stderr"][0], rel=1e-9)
    assert row["gamma_dot_stderr_end"] == pytest.approx(r.transport["gamma_dot_stderr"][-1], rel=1e-9)
    assert row["chi2"] == pytest.approx(r.chi2) and row["reduced_chi2"] == pytest.approx(r.reduced_chi2)
    assert row["converged"] == int(r.converged) and row["warnings"] == r.warnings
    assert row["n_warnings"] == len(r.warnings) and row["result_path"] == str(fitted["laminar_flow"])
    with Catalogue(path) as cat:
        attempts = cat.attempts()
        assert [x["status"] for x in attempts] == ["done", "failed"]
        assert attempts[1]["error"] == "a.hdf: c2 holds NaN at (3, 4)"
        assert attempts[0]["wall_time_s"] >= 0 and attempts[0]["ended_at"].endswith("Z")
        assert len(cat.results()) == 1  # a failed attempt keeps the unit's current result
        (latest,) = cat.latest()
        assert latest["status"] == "failed" and latest["attempt_id"] == b and latest["attempt"] == a
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.slow  # the session's two small fits on a LocalCluster
def test_static_result_and_queries(tmp_path, results):
    path = tmp_path / "xpcsfit.sqlite"
    with Catalogue(path, write=True) as cat:
        for i, mode in enumerate(("laminar_flow", "static")):
            a = cat.begin(**{**UNIT, "q_index": [i], "mode": mode})
            cat.finish(a, results[mode], None)
        joint = cat.begin(**{**UNIT, "q_index": [3, 8], "q": [0.004, 0.006]})
        static_row = cat.results("mode = 'static'")[0]
        assert static_row["gamma_dot_t0"] is None and static_row["gamma_dot_start"] is None
        assert static_row["J_middle"] == pytest.approx(results["static"].J(static_row["t_middle"]))
        assert [r["q_index"] for r in cat.results("D0 > 0 AND converged")] == ["0", "1"]
        assert cat.attempts(f"id = {joint}")[0]["q"] is None
        assert cat.attempts(f"id = {joint}")[0]["q_values"] == [0.004, 0.006]
        with pytest.raises(ConfigError, match=r"where 'nope > 1': not a valid condition on results \(no such column: nope\)"):
            cat.results("nope > 1")
    frame = catalogue(path)
    assert list(frame["mode"]) == ["laminar_flow", "static"] and frame["converged"].dtype == bool
    assert frame["ended_at"].dt.tz is not None and isinstance(frame["warnings"][0], list)
    assert np.isnan(frame["gamma_dot_t0"][1])
    assert len(catalogue(path, where="mode = 'static'")) == 1


def test_readers_cannot_write(tmp_path):
    path = tmp_path / "xpcsfit.sqlite"
    Catalogue(path, write=True).close()
    with Catalogue(path) as cat:
        with pytest.raises(ConfigError, match="not a valid condition on results .*one statement"):
            cat.results("1); DELETE FROM results; SELECT (1")
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only"):
            cat._db.execute("DELETE FROM results")


def test_one_writer_and_interrupted_attempts(tmp_path):
    path = tmp_path / "xpcsfit.sqlite"
    first = Catalogue(path, write=True)
    first.begin(**UNIT)  # a writer killed mid-fit leaves this "running"
    with pytest.raises(XpcsfitError, match=r"xpcsfit.sqlite: another xpcsfit batch is writing this catalogue$"):
        Catalogue(path, write=True)
    with Catalogue(path) as reader:  # readers do not need the lock
        assert reader.attempts()[0]["status"] == "running"
    first.close()
    with Catalogue(path, write=True) as cat:
        assert cat.attempts()[0]["status"] == "interrupted"


def test_schema_version_and_migration(tmp_path, monkeypatch):
    path = tmp_path / "xpcsfit.sqlite"
    Catalogue(path, write=True).close()
    v = SCHEMA_VERSION
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == v == 2
    step = v + 1
    monkeypatch.setattr(catmod, "MIGRATIONS", {**catmod.MIGRATIONS, step: "ALTER TABLE results ADD COLUMN note TEXT"})
    monkeypatch.setattr(catmod, "SCHEMA_VERSION", step)
    with pytest.raises(InputError, match=rf"schema {v}, this xpcsfit reads {step}; the next xpcsfit batch run migrates it"):
        Catalogue(path)
    with Catalogue(path, write=True) as cat:
        assert "note" in cat.columns("results")
    monkeypatch.setattr(catmod, "SCHEMA_VERSION", v)
    with pytest.raises(InputError, match=rf"catalogue schema {step} is newer than this xpcsfit reads \({v}\)"):
        Catalogue(path)
    # a failing migration leaves the previous schema
    bad = tmp_path / "bad.sqlite"
    Catalogue(bad, write=True).close()
    monkeypatch.setattr(catmod, "MIGRATIONS", {**catmod.MIGRATIONS, step: "ALTER TABLE results ADD COLUMN x; SELECT nope"})
    monkeypatch.setattr(catmod, "SCHEMA_VERSION", step)
    with pytest.raises(InputError, match="not an xpcsfit catalogue"):
        Catalogue(bad, write=True)
    db = sqlite3.connect(bad)
    assert db.execute("PRAGMA user_version").fetchone()[0] == v
    assert "x" not in [r[1] for r in db.execute("PRAGMA table_info(results)")]


def test_schema_1_gains_the_hash_cache_and_keeps_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "xpcsfit.sqlite"
    monkeypatch.setattr(catmod, "SCHEMA_VERSION", 1)
    with Catalogue(path, write=True) as cat:
        cat.begin(**UNIT)
    monkeypatch.undo()
    with Catalogue(path, write=True) as cat:
        assert "sha256" in cat.columns("hashes") and len(cat.attempts()) == 1


def test_sha256_read_again_only_when_size_or_mtime_change(tmp_path, monkeypatch):
    data = tmp_path / "a.hdf"
    data.write_bytes(b"x" * 1000)
    reads = []
    monkeypatch.setattr(catmod, "sha256_file", lambda p: reads.append(p) or hashlib.sha256(Path(p).read_bytes()).hexdigest())
    with Catalogue(tmp_path / "xpcsfit.sqlite", write=True) as cat:
        first = cat.sha256(data)
        assert cat.sha256(data) == first and len(reads) == 1
    with Catalogue(tmp_path / "xpcsfit.sqlite", write=True) as cat:  # kept across runs
        assert cat.sha256(data) == first and len(reads) == 1
        data.write_bytes(b"y" * 1000)  # same size, a new mtime
        os.utime(data, ns=(1, 10**18))
        assert cat.sha256(data) == hashlib.sha256(b"y" * 1000).hexdigest() != first and len(reads) == 2


def test_not_a_catalogue(tmp_path):
    with pytest.raises(InputError, match=r"nothing.sqlite: no such catalogue$"):
        Catalogue(tmp_path / "nothing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("hello " * 200)
    with pytest.raises(InputError, match=r"junk.sqlite: not an xpcsfit catalogue \(file is not a database\)"):
        Catalogue(junk)


@pytest.mark.slow  # the session's two small fits on a LocalCluster
def test_fit_json_is_what_the_catalogue_reads(fitted):
    doc = json.loads((fitted["static"] / "fit.json").read_text())
    assert doc["mode"] == "static" and "transport" in doc
