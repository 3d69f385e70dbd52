"""Combining sub-posteriors, diagnostics of draws, and the summary's refusal of no draws."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from xpcsfit.cmc.combine import combine, ess_bulk, r_hat, transport_draws
from xpcsfit.cmc.results import summarise
from xpcsfit.errors import SamplingError, XpcsfitError


def gaussian_subposteriors(rng, K=4, n=4000, p=3):
    """K Gaussian sub-posteriors and their exact product (mean, covariance)."""
    subs, precisions, shifts = [], [], []
    for _ in range(K):
        a = rng.normal(size=(p, p))
        cov = a @ a.T + p * np.eye(p)
        mean = rng.normal(size=p)
        subs.append(rng.multivariate_normal(mean, cov, size=(1, n)))
        P = np.linalg.inv(cov)
        precisions.append(P)
        shifts.append(P @ mean)
    cov = np.linalg.inv(sum(precisions))
    return np.stack(subs), cov @ sum(shifts), cov


@pytest.mark.parametrize("method", ["consensus", "parametric"])
def test_combine_gaussian_product(method):
    rng = np.random.default_rng(0)
    subs, mean, cov = gaussian_subposteriors(rng)
    out = combine(subs, method, seed=1).reshape(-1, 3)
    assert out.shape == (4000, 3)
    sd = np.sqrt(np.diag(cov))
    # The combined mean of 4000 draws has sd ≈ sd/√4000 ≈ 0.016 sd plus the error of
    # the estimated weights (of the same order): 0.1 sd is > 4 of either.
    np.testing.assert_allclose(out.mean(axis=0), mean, atol=0.1 * sd.max())
    # A sample covariance of 4000 draws has relative error ≈ √(2/4000) ≈ 2 %; 10 %.
    np.testing.assert_allclose(np.cov(out.T), cov, rtol=0.1, atol=0.1 * sd.max() ** 2)


def test_combine_keeps_chain_structure_and_single_shard():
    rng = np.random.default_rng(1)
    subs = rng.normal(size=(3, 2, 500, 2))
    assert combine(subs).shape == (2, 500, 2)
    np.testing.assert_array_equal(combine(subs[:1]), subs[0])


def test_r_hat_and_ess():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 1000))
    # iid draws: R-hat is 1 within its sampling error (~1e-3 for 4 × 1000 draws) and
    # the bulk ESS is the number of draws within ~10 %.
    assert r_hat(x) < 1.01
    assert 0.8 * x.size < ess_bulk(x) < 1.2 * x.size
    x[0] += 2.0  # one chain elsewhere
    assert r_hat(x) > 1.1
    ar = np.zeros((2, 2000))
    for t in range(1, 2000):  # AR(1), phi = 0.9: ESS ≈ n (1 - 0.9)/(1 + 0.9) ≈ 5 %
        ar[:, t] = 0.9 * ar[:, t - 1] + rng.normal(size=2)
    assert ess_bulk(ar) < 0.15 * ar.size


def test_transport_draws_per_draw_and_time():
    theta = np.array([[[2.0e4, -0.5, 1.0e3, 1.0e-3, 0.5, 2.0e-4, 3.0]],
                      [[1.0e4, 0.0, 0.0, 2.0e-3, 0.0, 0.0, 0.0]]])  # (2 chains, 1 draw, p)
    t = np.array([1.0, 4.0])
    out = transport_draws("laminar_flow", theta, t)
    assert out["J"].shape == out["gamma_dot"].shape == (2, 1, 2)
    np.testing.assert_allclose(out["J"][:, 0], [[2.1e4, 2.0e4 * 0.5 + 1.0e3], [1.0e4, 1.0e4]])
    np.testing.assert_allclose(out["gamma_dot"][:, 0], [[1.2e-3, 2.0e-3 + 2.0e-4], [2.0e-3, 2.0e-3]])
    assert set(transport_draws("static", theta[..., :3], t)) == {"J"}


def test_all_shards_failed_is_a_sampling_error():
    failed = [{"index": k, "name": f"shard-{k:02d}", "error": "KilledWorker: gone"} for k in range(3)]
    run = SimpleNamespace(plan=SimpleNamespace(n_shards=3))  # nothing else is read before the check
    with pytest.raises(SamplingError, match="all 3 cmc shards failed; first error: KilledWorker: gone") as err:
        summarise(failed, run)
    assert isinstance(err.value, XpcsfitError) and err.value.exit_code == 5


def test_shard_discrepancy_is_chi_square_for_alike_shards_and_names_a_shifted_one():
    from scipy.stats import kstest

    from xpcsfit.cmc.combine import DISCREPANCY_P_LIMIT, shard_discrepancy

    rng = np.random.default_rng(5)
    p, K, n = 3, 4, 2000
    a = rng.normal(size=(p, p))
    cov = a @ a.T + np.eye(p)
    chol = np.linalg.cholesky(cov)
    pvals = []
    for _ in range(40):
        # K data subsets of one Gaussian model: sub-posteriors N(m_k, cov), their means
        # scattered about the truth by the data with that same covariance.
        means = rng.normal(size=(K, p)) @ chol.T
        draws = means[:, None, None, :] + rng.normal(size=(K, 1, n, p)) @ chol.T
        pvals += [d["p_value"] for d in shard_discrepancy(draws)]
    # Alike shards: d² ~ chi²(p), so the p-values are uniform (the draws' mean and
    # covariance errors, ~1/√2000, shift them by far less than the KS test can see at
    # 160 values); and none reaches the alarm limit (probability 160 · 1e-6).
    assert kstest(pvals, "uniform").pvalue > 1e-3
    assert min(pvals) > DISCREPANCY_P_LIMIT
    # One shard 8 of its sds away in the first coordinate: named, the others are not.
    means = rng.normal(size=(K, p)) @ chol.T
    means[2, 0] += 8 * np.sqrt(cov[0, 0])
    draws = means[:, None, None, :] + rng.normal(size=(K, 1, n, p)) @ chol.T
    out = shard_discrepancy(draws)
    assert out[2]["p_value"] < 1e-9
    # The good shards are compared with one another, not with a rest the bad one pulls.
    for k in (0, 1, 3):
        assert out[k]["p_value"] > DISCREPANCY_P_LIMIT and 2 not in out[k]["compared_with"], out[k]
