"""The pieces of leastsq/uncertainty.py without a fit: the noise estimator and the
inflated covariance."""

import numpy as np

from xpcsfit.leastsq.results import covariance_from_normal_equations
from xpcsfit.leastsq.uncertainty import inflated_covariance, noise_levels


def test_noise_level_is_the_spread_about_each_diagonal_mean():
    rng = np.random.default_rng(0)
    n_t, sd = 200, np.array([0.01, 0.03])
    lag = np.arange(n_t)[None, :] - np.arange(n_t)[:, None]
    sums, counts, squares = (np.zeros((2, n_t)) for _ in range(3))
    for b in range(2):
        # a decay along the lag (which the per-lag mean removes) plus noise of sd[b]
        c2 = 1.0 + 0.3 * np.exp(-np.abs(lag) / 20.0) + sd[b] * rng.standard_normal((n_t, n_t))
        for k in range(1, n_t):
            d = np.diagonal(c2, k)
            sums[b, k], counts[b, k], squares[b, k] = d.sum(), d.size, (d * d).sum()
    # ~20,000 points per bin: the relative sd of a variance estimate is sqrt(2/n) = 1 %
    np.testing.assert_allclose(noise_levels(sums, counts, squares), sd, rtol=0.03)
    assert np.all(noise_levels(np.zeros((2, 5)), np.ones((2, 5)), np.zeros((2, 5))) == 1.0)  # no noise


def test_inflated_covariance_is_kappa_times_naive_for_equal_kappas():
    rng = np.random.default_rng(1)
    J1, J2 = rng.standard_normal((50, 6)), rng.standard_normal((80, 6))
    H1, H2 = J1.T @ J1, J2.T @ J2
    naive, _ = covariance_from_normal_equations(H1 + H2, 2.0, 1)
    np.testing.assert_allclose(inflated_covariance(H1 + H2, [H1, H2], np.array([3.0, 3.0]), 2.0), 3 * naive,
                               rtol=1e-10)
    np.testing.assert_allclose(inflated_covariance(H1 + H2, [], np.array([4.0]), 2.0), 4 * naive, rtol=1e-12)
    # unequal: between the two, and the noisier q's share grows
    mixed = inflated_covariance(H1 + H2, [H1, H2], np.array([1.0, 9.0]), 2.0)
    assert np.all(np.diag(mixed) > np.diag(naive)) and np.all(np.diag(mixed) < 9 * np.diag(naive))
