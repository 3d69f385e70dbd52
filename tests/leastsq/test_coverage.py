"""Coverage of the J(t) and gamma_dot(t) bands over many simulated files (DESIGN.md §6a):
speckle-realistic noise (xpcsfit simulate --speckle) and white noise, fixed seeds."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
import pytest
from coverage_helpers import fit_z_scores

pytestmark = pytest.mark.slow

N_FILES = 30
# Speckle: 4 phi × 300 frames, 512 pixels and 128 particles per bin (noise correlated
# over ≈ 40 frames: the naive bands are 3–8× too narrow). White: the same grid, σ = 0.02.
SPECKLE = dict(speckle=True, n_frames=300, n_phi=4, tile=64, sim=dict(pixels=512, particles=128))
WHITE = dict(speckle=False, n_frames=300, n_phi=4, tile=64, sim=dict(noise=0.02))


def _z_scores(kind: dict, seeds) -> np.ndarray:
    # Two processes (the CI machine has 2 cores); spawned, as JAX must not be forked.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.array(list(pool.map(partial(fit_z_scores, **kind), seeds)))


@pytest.fixture(scope="module")
def speckle_z():
    return _z_scores(SPECKLE, range(100, 100 + N_FILES))


@pytest.fixture(scope="module")
def white_z():
    return _z_scores(WHITE, range(200, 200 + N_FILES))


def _coverage(z):
    a = np.abs(z)
    return float((a < 1).mean()), float((a < 2).mean())


def test_speckle_bands_cover_the_truth(speckle_z):
    one, two = _coverage(speckle_z[:, :6])
    naive_one, naive_two = _coverage(speckle_z[:, 6:])
    print(f"speckle coverage (1σ, 2σ): corrected {one:.3f}, {two:.3f}; naive {naive_one:.3f}, {naive_two:.3f}")
    # 30 files × 6 band points, but the three times of one curve are strongly correlated:
    # about 2 independent points per curve, 60 per curve kind, 120 in all. The binomial
    # sd of a 68 % fraction over 120 is 4.3 %, of 95 % 2.0 %: the 68 ± 10 % and
    # 95 ± 5 % are 2.3 and 2.5 sd (and the seeds are fixed, so the outcome is too).
    assert 0.58 <= one <= 0.78, one
    assert 0.90 <= two <= 1.00, two
    # The naive bands are the ones that fail: the test can tell them apart.
    assert naive_one < 0.45, naive_one


def test_white_noise_bands_still_cover_the_truth(white_z):
    one, two = _coverage(white_z[:, :6])
    naive_one, _ = _coverage(white_z[:, 6:])
    print(f"white-noise coverage (1σ, 2σ): corrected {one:.3f}, {two:.3f}; naive {naive_one:.3f}")
    # As for the speckle files; independent noise needs (and gets) no inflation.
    assert 0.58 <= one <= 0.78, one
    assert 0.90 <= two <= 1.00, two
    assert 0.58 <= naive_one <= 0.78, naive_one
