"""The speckle simulation: its c2, averaged over seeds, is the model's g2; its noise is
correlated along rows, as a correlator's is."""

import numpy as np

from xpcsfit.model import c2_model
from xpcsfit.parameters import MODES
from xpcsfit.simulate import TRUTH
from xpcsfit.speckle import correlate, speckle_intensities

THETA = np.array([(TRUTH | {"alpha": 0.3, "D_offset": 3.0e3, "beta": -0.2})[n] for n in MODES["laminar_flow"]])
N_SEEDS, T, PARTICLES = 16, 120, 128
LAGS = np.arange(1, 60)


def test_mean_c2_over_seeds_is_the_model():
    t = np.arange(1, T + 1) * 0.1
    q, L = 0.0055, 2.0e6
    for phi in (6.0, 96.0):  # along the flow (shear decorrelates) and across it (diffusion alone)
        maps = np.stack([correlate(speckle_intensities(np.random.default_rng([7, s]), q, phi, THETA,
                                                        "laminar_flow", t, L, pixels=256,
                                                        particles=PARTICLES, counts=2.0))
                         for s in range(N_SEEDS)])
        contrast = 0.25 * (1.0 - 1.0 / PARTICLES)  # 2 × 2 speckles per pixel, N particles (Siegert)
        model = np.asarray(c2_model(THETA, np.array([contrast]), np.array([1.0]), "laminar_flow", q, L,
                                    np.array([phi]), t, t))[0]
        # per lag, averaged over the map's rows: the seed-to-seed scatter gives each its se
        per_seed = np.array([[np.diagonal(m, k).mean() for k in LAGS] for m in maps])
        expected = np.array([np.diagonal(model, k).mean() for k in LAGS])
        mean, se = per_seed.mean(0), per_seed.std(0, ddof=1) / np.sqrt(N_SEEDS)
        # 4 se per lag (59 lags: a 4-se excursion anywhere has probability 0.4 %; the se of
        # 16 seeds is itself uncertain by 18 %, still < 1 % at 4 × 0.82 se), plus
        # 2e-3 for the known biases: the bin's 10 % width in q and angle around the
        # centre the model uses (relative O(width²/12) ≈ 1e-3 of the contrast) and the
        # ratio of pixel means (O(1/pixels) of the contrast).
        np.testing.assert_array_less(np.abs(mean - expected), 4 * se + 2e-3)
        # The decay is there: the test is not passing on a flat map.
        assert expected[0] - expected[-1] > 0.1 and mean[0] - mean[-1] > 0.1
        # Noise correlated along rows (shared frames): neighbours in a row share most of it.
        r = maps - model
        far = r[:, :60, 70:]  # points far from the diagonal
        rho = np.mean(far[:, :, 1:] * far[:, :, :-1]) / np.mean(far * far)
        assert rho > 0.15, rho  # ≈ 0.29 here; white noise would give 0
