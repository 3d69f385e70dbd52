"""What both layouts share: C2Reader, the map-shape checks, files that are not HDF5."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from xpcsfit.errors import InputError
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.hdf5 import C2Reader, read_info

from io_helpers import FLOW, MAPS


def test_reader_pickles_and_skips_lower_blocks(tmp_path):
    info = read_info(FLOW)
    keys = [[info.maps[(8, p)] for p in range(8)]]
    reader = pickle.loads(pickle.dumps(C2Reader(info.path, keys, (1, 499))))
    assert reader.shape == (1, 8, 499, 499)
    assert np.all(np.isnan(reader[:, :, 300:400, 0:100]))
    diag = reader[0, 2, 10:20, 10:20]
    assert diag.shape == (10, 10)
    assert np.isnan(diag[5, 4]) and np.isfinite(diag[4, 5]) and np.isfinite(diag[4, 4])


def test_non_square_map(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        del f[f"{MAPS}/c2_00005"]
        f[f"{MAPS}/c2_00005"] = np.zeros((500, 499), np.float32)
    with pytest.raises(InputError, match="c2_00005 is not a square 2-D map"):
        open_dataset(flow_copy, q_index=8)


def test_unequal_map_shapes(flow_copy):
    with h5py.File(flow_copy, "r+") as f:
        del f[f"{MAPS}/c2_00005"]
        f[f"{MAPS}/c2_00005"] = np.zeros((400, 400), np.float32)
    with pytest.raises(InputError, match="c2_00005 has shape \\(400, 400\\)"):
        open_dataset(flow_copy)


def test_missing_path_and_not_hdf(tmp_path):
    with pytest.raises(InputError, match="nope.hdf: no such file"):
        open_dataset(tmp_path / "nope.hdf")
    text = tmp_path / "text.hdf"
    text.write_text("hello")
    with pytest.raises(InputError, match="text.hdf: not an HDF5 file"):
        open_dataset(text)
    (tmp_path / "somedir").mkdir()
    with pytest.raises(InputError, match="somedir: exists but is not an xpcsfit store"):
        open_dataset(tmp_path / "somedir")

