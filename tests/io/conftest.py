"""Fixtures of the io tests."""

import shutil

import pytest

from data_paths import FLOW


@pytest.fixture
def flow_copy(tmp_path):
    """A writable copy of flow_small.hdf, for tests that break a key of it."""
    dst = tmp_path / "flow.hdf"
    shutil.copy(FLOW, dst)
    dst.chmod(0o644)
    return dst
