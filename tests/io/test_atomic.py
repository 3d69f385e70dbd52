"""Write-then-rename: files and directories appear whole or not at all; an HDF5
file is never half written."""

import os

import numpy as np
import pytest

from xpcsfit.errors import ConfigError
from xpcsfit.io.apsu import write_aps_u
from xpcsfit.io.atomic import _exchange, atomic_directory, atomic_file


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith("f.txt.tmp-") and tmp.exists()
            tmp.write_text("half")
            raise RuntimeError("midway")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]
    with atomic_file(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # not in place before the block ends
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_failed_hdf5_write_leaves_the_earlier_file(tmp_path):
    path = write_aps_u(tmp_path / "a.hdf", q_grid=[0.003], phi_grid=[0.0],
                       maps={(0, 0): np.ones((8, 8))}, frame_time=0.1)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="band rows 0:8 has shape"):
        write_aps_u(path, q_grid=[0.003], phi_grid=[0.0], maps={(0, 0): lambda a, b: np.ones((1, 8))},
                    frame_time=0.1, n_frames=8)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.hdf"]


def test_atomic_directory(tmp_path):
    final = tmp_path / "store"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_directory(final) as partial:
            assert partial.name.startswith("store.partial-") and partial.is_dir()
            (partial / "chunk").write_text("1")
            raise RuntimeError("midway")
    assert os.listdir(tmp_path) == []
    with atomic_directory(final) as partial:
        (partial / "chunk").write_text("1")
    assert os.listdir(tmp_path) == ["store"] and (final / "chunk").read_text() == "1"
    with pytest.raises(FileExistsError):  # built by someone else meanwhile: not replaced
        with atomic_directory(final) as partial:
            (partial / "chunk").write_text("2")
    assert os.listdir(tmp_path) == ["store"] and (final / "chunk").read_text() == "1"


def test_exchange_swaps_directories_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new").write_text("new")
    (b / "old").write_text("old")
    assert _exchange(a, b), "renameat2(RENAME_EXCHANGE) unsupported here: the swap is not atomic"
    assert (b / "new").exists() and (a / "old").exists()
