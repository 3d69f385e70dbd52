"""NaN/Inf in c2: one check and one message, at open and when a worker loads a tile."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xpcsfit.engine.tiles import plan_tiles
from xpcsfit.errors import InputError
from xpcsfit.io.apsu import write_aps_u
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.finite import require_finite

from io_helpers import random_maps


def _check(ds):
    frames = np.arange(ds.sizes["t1"])
    require_finite(ds["c2"].data, frames, frames, source=ds.attrs["source"],
                   q=ds["q"].values, phi=ds["phi"].values)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_c2(tmp_path, bad):
    arrays = random_maps([(0, 0), (0, 1), (1, 0), (1, 1)], 16)
    arrays[(1, 1)][3, 9] = bad
    arrays[(0, 1)][9, 3] = np.nan  # below the diagonal: ignored
    path = write_aps_u(tmp_path / "nan.hdf", q_grid=[0.002, 0.004], phi_grid=[0.0, 90.0], maps=arrays, frame_time=0.1)
    with pytest.raises(InputError, match=r"nan.hdf: non-finite c2 values .* q=0.004 1/Å, phi=90 deg"):
        open_dataset(path)
    ds = open_dataset(path, q_index=0)  # the bad map is not selected
    assert ds.attrs["q_index"] == [0]
    assert open_dataset(path, frames=(4, 15)).attrs["frames"] == [4, 15]  # bad value left out


def test_require_finite_on_a_loaded_block():
    block = np.ones((2, 4, 4), np.float32)
    rows = cols = np.arange(10, 14)
    block[1, 3, 0] = np.nan  # below the diagonal
    require_finite(block, rows, cols, source="f.hdf", q=0.005, phi=[10.0, 20.0])
    block[1, 1, 1] = np.inf  # diagonal: not fitted
    require_finite(block, rows, cols, source="f.hdf", q=0.005, phi=[10.0, 20.0])
    block[1, 0, 2] = np.nan
    with pytest.raises(InputError) as err:
        require_finite(block, rows, cols, source="f.hdf", q=0.005, phi=[10.0, 20.0])
    assert str(err.value) == "f.hdf: non-finite c2 values above the diagonal at q=0.005 1/Å, phi=20 deg"
    # off-diagonal tile: every element is above the diagonal
    four = np.ones((1, 2, 3, 3), np.float32)
    four[0, 0, 2, 0] = np.nan
    with pytest.raises(InputError, match="q=0.003 1/Å, phi=5 deg"):
        require_finite(four, np.arange(0, 3), np.arange(5, 8), source="f.hdf", q=[0.003], phi=[5.0, 6.0])


def test_require_finite_uses_chunk_positions(tmp_path):
    arrays = random_maps([(0, 0)], 50)
    arrays[(0, 0)][30, 41] = np.nan
    path = write_aps_u(tmp_path / "late.hdf", q_grid=[0.002], phi_grid=[7.0], maps=arrays, frame_time=0.1)
    ds = open_dataset(path, frames=(1, 29), tile=8)  # the NaN lies outside the frames
    _check(ds)
    with pytest.raises(InputError, match="late.hdf: non-finite .* phi=7 deg"):
        open_dataset(path, tile=8)  # inside chunk (3, 5) of 8-frame tiles
    i = xr.DataArray(np.arange(29), dims="t1")
    j = xr.DataArray(np.arange(29), dims="t2")
    _check(ds.assign(c2=ds["c2"].where(j > i)))  # NaN on the diagonal is not fitted
    with pytest.raises(InputError, match="phi=7 deg"):
        _check(ds.assign(c2=ds["c2"].where(j != i + 10)))  # NaN just above it


def test_tile_load_gives_the_same_message(tmp_path):
    """fit opens without the eager check; the tile holding the NaN refuses to load."""
    arrays = random_maps([(0, 0), (0, 1)], 40)
    arrays[(0, 1)][12, 30] = np.inf
    arrays[(0, 0)][30, 12] = np.nan  # below the diagonal: ignored
    path = write_aps_u(tmp_path / "tile.hdf", q_grid=[0.003], phi_grid=[15.0, 75.0], maps=arrays, frame_time=0.1)
    with pytest.raises(InputError) as at_open:
        open_dataset(path, tile=8)
    ds = open_dataset(path, tile=8, check_finite=False)
    failed = []
    for spec in plan_tiles(ds, 8):
        try:
            spec.load()
        except InputError as exc:
            failed.append((spec.index, str(exc)))
    # frame 12 is row 11 (tile 1), frame 30 column 29 (tile 3) of frames 1 … 39
    assert failed == [((0, 1, 3), str(at_open.value))]
    assert str(at_open.value).endswith("tile.hdf: non-finite c2 values above the diagonal at q=0.003 1/Å, phi=75 deg")
