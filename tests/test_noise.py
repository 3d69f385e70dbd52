"""The CMC noise scale: per-bin variance and correlated-noise inflation from the residuals."""

from __future__ import annotations

import numpy as np
import pytest

import xpcsfit
from xpcsfit.engine.kernel import ParameterLayout, tile_model
from xpcsfit.engine.tiles import plan_tiles
from xpcsfit.noise import noise_model, tile_noise_sums
from xpcsfit.parameters import MODES

MAX_LAG = 16


@pytest.fixture(scope="module")
def at_truth(static_file):
    """Tiles of static_file, x at the simulated truth, and each tile's noise sums there."""
    ds = xpcsfit.open_dataset(static_file)
    layout = ParameterLayout(MODES["static"], 1, 3)
    x = layout.join([1.0e4, -0.6, 5.0e3], np.full(3, 0.25), np.full(3, 1.0))
    tiles = [spec.load() for spec in plan_tiles(ds, 64)]
    parts = [tile_noise_sums(t, x, layout, "static", 2e6, MAX_LAG) for t in tiles]
    return tiles, x, layout, parts


def test_noise_pass_on_white_noise(at_truth):
    _, _, _, parts = at_truth
    noise = noise_model(parts, 1, 3, thin=2, max_lag=MAX_LAG)
    # Residuals at the truth are the simulated iid noise, sd 0.01: an sd estimated from
    # n = 7021 points per bin has relative sd 1/√(2n) ≈ 0.85 %; 3 % is 3.5 of those.
    np.testing.assert_allclose(noise["sigma"], 0.01, rtol=0.03)
    # White noise: no inflation beyond the sampling noise of the summed correlations.
    assert 1.0 <= noise["kappa"][0] < 1.1


def test_fft_lag_sums_equal_direct_sums(at_truth):
    tiles, x, layout, parts = at_truth
    tile = tiles[0]
    r = (tile.c2 - tile_model(tile, x, layout, "static", 2e6)) * tile.weight
    n = r.shape[1]
    for a, b in ((2, -3), (0, 1), (-4, 0)):
        direct = (r[:, max(0, -a): n - max(0, a), max(0, -b): n - max(0, b)]
                  * r[:, max(0, a): n + min(0, a), max(0, b): n + min(0, b)]).sum(axis=(1, 2))
        np.testing.assert_allclose(parts[0]["acf"][:, MAX_LAG + a, MAX_LAG + b], direct, rtol=1e-8, atol=1e-12)
