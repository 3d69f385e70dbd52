"""Fingerprints: stable across runs and processes, changed by exactly what changes the fit."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
from batch_helpers import apsu_file

from xpcsfit.batch import fingerprint as fp
from xpcsfit.batch.discover import discover
from xpcsfit.batch.settings import SETTINGS_FILE, SettingsCascade
from xpcsfit.batch.units import units_of
from xpcsfit.io.hdf5 import sha256_file


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    apsu_file(root / "s" / "a.hdf", q=(0.004, 0.006), n_frames=20)
    return root


def unit(tree, settings=None, index=0):
    found = discover(tree).found[0]
    return units_of(found, SettingsCascade(settings).resolve(found.path, found.root))[index]


def test_hashes_the_file_once_given(tree):
    u = unit(tree)
    sha = sha256_file(u.path)
    assert fp.fingerprint(u) == fp.fingerprint(u, sha)
    doc = fp.fingerprint_of(u, sha)
    assert sorted(doc) == ["input", "selection", "settings", "xpcsfit_version"]
    assert doc["input"] == {"sha256": sha, "layout": "aps-u"}
    assert "q_index" not in doc["settings"] and doc["settings"]["mode"] == "laminar_flow"


def test_stable_across_processes(tree):
    code = ("import sys; from test_batch_fingerprint import unit; from pathlib import Path; "
            "from xpcsfit.batch.fingerprint import fingerprint; print(fingerprint(unit(Path(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]),
               PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == fp.fingerprint(unit(tree))


def test_changed_by_what_changes_the_fit(tree, monkeypatch):
    base = fp.fingerprint(unit(tree), "0" * 64)
    assert fp.fingerprint(unit(tree), "1" * 64) != base  # input content
    assert fp.fingerprint(unit(tree, index=1), "0" * 64) != base  # q
    assert fp.fingerprint(unit(tree, {"frames": [1, 18]}), "0" * 64) != base
    assert fp.fingerprint(unit(tree, {"gap": 3e6}), "0" * 64) != base
    assert fp.fingerprint(unit(tree, {"joint": True}), "0" * 64) != base
    monkeypatch.setattr(fp, "xpcsfit_version", lambda: "99.0")
    assert fp.fingerprint(unit(tree), "0" * 64) != base


def test_not_changed_by_where_the_settings_come_from(tree):
    explicit = unit(tree, {"frames": [1, 19], "gap": 3e6, "bounds": {"alpha": [-1, 1], "D0": [100, 1e6]}})
    (tree / SETTINGS_FILE).write_text("bounds: {D0: [100, 1.0e6]}\n")
    (tree / "s" / SETTINGS_FILE).write_text("gap: 3.0e6\nbounds: {alpha: [-1, 1]}\n")
    try:
        cascaded = unit(tree)
    finally:
        (tree / SETTINGS_FILE).unlink()
        (tree / "s" / SETTINGS_FILE).unlink()
    assert cascaded.sources != explicit.sources
    assert fp.fingerprint(cascaded, "0" * 64) == fp.fingerprint(explicit, "0" * 64)
    moved = replace(cascaded, path=tree / "elsewhere.hdf", root=tree)
    assert fp.fingerprint(moved, "0" * 64) == fp.fingerprint(cascaded, "0" * 64)
