"""The settings cascade: xpcsfit.yaml nearest wins, merged key by key over --config."""

from __future__ import annotations

import pytest

from xpcsfit.batch.settings import SETTINGS_FILE, BatchSettings, SettingsCascade, merge
from xpcsfit.config import FitConfig
from xpcsfit.errors import ConfigError


def write(directory, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SETTINGS_FILE).write_text(text)


@pytest.fixture
def tree(tmp_path):
    write(tmp_path, "mode: static\nbounds: {D0: [100, 1.0e6]}\nq_index: all\n")
    write(tmp_path / "s1", "frames: [2, 50]\nbounds: {alpha: [-1, 1]}\n")
    write(tmp_path / "s1" / "deep", "q_index: 3\ninitial: {D0: 5.0e5}\n")
    (tmp_path / "s2").mkdir()
    return tmp_path


def test_nearest_wins_key_by_key(tree):
    cascade = SettingsCascade({"mode": "laminar_flow", "gap": 3.0e6, "joint": True})
    r = cascade.resolve(tree / "s1" / "deep" / "x.hdf", tree)
    s = r.settings
    assert s.mode == "static" and s.gap == 3.0e6 and s.joint is True
    assert s.q_index == [3] and s.frames == (2, 50)
    # bounds merged entry by entry; initial.D0 is checked against the farther file's bound
    assert s.bounds == {"D0": (100.0, 1.0e6), "alpha": (-1.0, 1.0)} and s.initial == {"D0": 5.0e5}
    assert r.sources == ("config", str(tree / SETTINGS_FILE), str(tree / "s1" / SETTINGS_FILE),
                         str(tree / "s1" / "deep" / SETTINGS_FILE))
    assert cascade.resolve(tree / "s2" / "y.hdf", tree).settings.frames is None
    assert isinstance(s.fit_config(), FitConfig) and not isinstance(s.fit_config(), BatchSettings)
    assert s.fit_config().bounds == s.bounds


def test_defaults_and_config_file(tmp_path):
    assert SettingsCascade().resolve(tmp_path / "x.hdf", tmp_path).settings == BatchSettings()
    cfg = tmp_path / "run.yaml"
    cfg.write_text("q_index: [8, 3]\ngap: 1e6\n")
    write(tmp_path / "a", "gap: 2e6\n")
    r = SettingsCascade(cfg).resolve(tmp_path / "a" / "x.hdf", tmp_path / "a")
    assert r.settings.q_index == [3, 8] and r.settings.gap == 2e6
    assert r.sources == (str(cfg), str(tmp_path / "a" / SETTINGS_FILE))


def test_directories_above_root_do_not_apply(tree):
    r = SettingsCascade().resolve(tree / "s1" / "x.hdf", tree / "s1")
    assert r.settings.mode == "laminar_flow" and r.sources == (str(tree / "s1" / SETTINGS_FILE),)


@pytest.mark.parametrize("text, message", [
    ("q_index: [1, 1]\n", r"s1/xpcsfit.yaml: q_index: expected all, a q index .*\(got \[1, 1\]\)"),
    ("frames: [0, 9]\n", r"s1/xpcsfit.yaml: frames: need 1 <= first < last"),
    ("q_index: [a]\n", r"s1/xpcsfit.yaml: q_index: expected all"),
    ("joint: 1\n", r"s1/xpcsfit.yaml: joint: .*\(got 1\)"),
    ("modee: static\n", r"s1/xpcsfit.yaml: modee: unknown key \(known: .*q_index, joint, frames, in_process_max_points\)"),
    ("solver: {ftol: 2}\n", r"s1/xpcsfit.yaml: solver.ftol: .*\(got 2\)"),
    ("gap: [1\n", r"s1/xpcsfit.yaml: line \d+, column \d+: not valid YAML"),
])
def test_errors_name_the_file_and_key(tree, text, message):
    write(tree / "s1", text)
    with pytest.raises(ConfigError, match=message) as info:
        SettingsCascade().resolve(tree / "s1" / "x.hdf", tree)
    assert "\n" not in str(info.value)


def test_error_across_files_names_every_file(tree):
    write(tree / "s2", "bounds: {phi0: [-5, 5]}\n")  # phi0 is not a parameter of the parent's static mode
    with pytest.raises(ConfigError, match=r"xpcsfit.yaml, .*s2/xpcsfit.yaml: bounds.phi0: not a parameter of mode static"):
        SettingsCascade().resolve(tree / "s2" / "x.hdf", tree)


def test_each_file_read_once_per_cascade(tree):
    cascade = SettingsCascade()
    assert cascade.resolve(tree / "s1" / "x.hdf", tree).settings.frames == (2, 50)
    write(tree / "s1", "frames: [3, 40]\n")
    assert cascade.resolve(tree / "s1" / "y.hdf", tree).settings.frames == (2, 50)
    assert SettingsCascade().resolve(tree / "s1" / "y.hdf", tree).settings.frames == (3, 40)


def test_merge():
    assert merge({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}, "b": None}) == {"a": {"x": 1, "y": 3}, "b": None}


def test_in_process_max_points_is_validated_and_not_a_fit_setting(tree):
    write(tree / "s1", "in_process_max_points: 0\n")
    s = SettingsCascade().resolve(tree / "s1" / "x.hdf", tree).settings
    assert s.in_process_max_points == 0 and "in_process_max_points" not in s.fit_config().model_dump()
    write(tree / "s1", "in_process_max_points: -1\n")
    with pytest.raises(ConfigError, match=r"s1/xpcsfit.yaml: in_process_max_points: .*greater than or equal to 0"):
        SettingsCascade().resolve(tree / "s1" / "x.hdf", tree)
