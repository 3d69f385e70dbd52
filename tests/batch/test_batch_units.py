"""Units of work: one per q, or one joint fit; selections checked against the file."""

from __future__ import annotations

import pytest
from batch_helpers import apsu_file

from xpcsfit.batch.discover import discover
from xpcsfit.batch.settings import SettingsCascade
from xpcsfit.batch.units import units_of
from xpcsfit.errors import ConfigError


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    apsu_file(root / "two_q.hdf", q=(0.004, 0.006), n_frames=20)
    return discover(root).found[0]


def units(found, **settings):
    return units_of(found, SettingsCascade(settings).resolve(found.path, found.root))


def test_one_unit_per_q_by_default(found):
    us = units(found)
    assert [u.q_index for u in us] == [(0,), (1,)]
    assert [u.q for u in us] == [(pytest.approx(0.004),), (pytest.approx(0.006),)]
    assert all(u.frames == (1, 19) and u.layout == "aps-u" for u in us)
    assert us[1].label == f"{found.path} q_index=1"
    assert us[1].selection() == {"q_index": [1], "q": [us[1].q[0]], "frames": [1, 19]}


def test_joint_and_chosen(found):
    (u,) = units(found, joint=True, frames=[2, 10])
    assert u.q_index == (0, 1) and u.frames == (2, 10) and u.label.endswith("q_index=0,1")
    assert [x.q_index for x in units(found, q_index=1)] == [(1,)]


@pytest.mark.parametrize("settings, message", [
    ({"q_index": [0, 2]}, r"two_q.hdf: settings from config: q_index 2 has no two-time maps .*\(q indices with maps: 0, 1\)"),
    ({"frames": [1, 20]}, r"two_q.hdf: settings from config: frames \[1, 20\] ends beyond the last frame 19"),
])
def test_selection_errors_name_file_and_key(found, settings, message):
    with pytest.raises(ConfigError, match=message):
        units(found, **settings)
