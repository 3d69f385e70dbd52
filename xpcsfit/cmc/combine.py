"""Combining CMC shards, and the numbers that describe draws: R-hat, ESS, quantiles, bands.

Combination (Scott et al., "Bayes and big data: the consensus Monte Carlo algorithm",
Int. J. Management Science and Engineering Management 11, 2016, Eqs. 3-4): with
sub-posterior draws w_k^(i) of shard k and W_k the inverse of their covariance,

    w^(i) = (Σ_k W_k)^-1 Σ_k W_k w_k^(i)

draw by draw (``numpyro.infer.hmc_util.consensus``; the combined draws keep the chain
structure, so R-hat and ESS are meaningful for them too). It is exact when every
sub-posterior is Gaussian. "parametric" draws from the Gaussian product of the
sub-posteriors instead (Neiswanger et al., 2014). Both work in the sampling
coordinates w (:mod:`xpcsfit.cmc.coordinates`), standardised by one common centre and scale first
(the coordinates span 1e-6 … 1e5, beyond what an unscaled covariance inverse tolerates;
both rules are unchanged by a common affine map).

Diagnostics follow Vehtari et al., "Rank-normalization, folding, and localization: an
improved R-hat", Bayesian Analysis 16, 2021: R-hat is the larger of the split R-hat of
the rank-normalised draws and of the rank-normalised folded draws; bulk ESS is the ESS
of the rank-normalised split chains.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

from xpcsfit.cmc.coordinates import PRIOR_SD
from xpcsfit.model import shear_rate, transport_coefficient

R_HAT_LIMIT = 1.01
ESS_PER_CHAIN = 100
ESS_MIN = 400  # bulk ESS of every reported quantity of a shard (2 chains × 500 draws: 0.4 per draw)
DIVERGENCE_LIMIT = 0.005  # fraction of a shard's kept transitions
# A shard whose sub-posterior disagrees with the other shards' combination beyond this
# chi-square tail probability is named (p parameters: Mahalanobis distance², see
# shard_discrepancy). 1e-6: the sub-posteriors are not exactly Gaussian, and a false
# alarm on good data costs a user a failed run; planted corruption gives p < 1e-30.
DISCREPANCY_P_LIMIT = 1e-6
COMBINE_METHODS = ("consensus", "parametric")


# ---------------------------------------------------------------- diagnostics


def _split(x):
    """(chains, draws) -> (2·chains, draws // 2)."""
    c, n = x.shape
    h = n // 2
    return np.concatenate([x[:, :h], x[:, n - h:]], axis=0)


def _rank_normal(x):
    r = rankdata(x, method="average").reshape(x.shape)
    return ndtri((r - 0.375) / (x.size + 0.25))


def _rhat(x):
    m, n = x.shape
    if n < 2 or m < 2:
        return float("nan")
    W = x.var(axis=1, ddof=1).mean()
    B = n * x.mean(axis=1).var(ddof=1)
    if W <= 0:
        return 1.0 if B == 0 else float("inf")
    return float(np.sqrt(((n - 1) / n * W + B / n) / W))


def r_hat(x) -> float:
    """Rank-normalised split R-hat (Vehtari et al. 2021) of draws (chains, draws)."""
    x = np.asarray(x, float)
    if x.shape[1] < 4:
        return float("nan")
    s = _split(x)
    bulk = _rhat(_rank_normal(s))
    folded = _rhat(_rank_normal(np.abs(s - np.median(s))))
    return max(bulk, folded)


def ess_bulk(x) -> float:
    """Bulk effective sample size (Vehtari et al. 2021) of draws (chains, draws)."""
    from numpyro.diagnostics import effective_sample_size

    x = np.asarray(x, float)
    if x.shape[1] < 4:
        return float("nan")
    z = _rank_normal(_split(x))
    if np.ptp(z) == 0:
        return float("nan")
    return float(effective_sample_size(z))


def describe(x) -> dict:
    """mean, sd, q03, q97, r_hat, ess_bulk of draws (chains, draws)."""
    x = np.asarray(x, float)
    flat = x.ravel()
    q03, q97 = np.quantile(flat, [0.03, 0.97])
    return {
        "mean": float(flat.mean()),
        "sd": float(flat.std(ddof=1)) if flat.size > 1 else float("nan"),
        "q03": float(q03),
        "q97": float(q97),
        "r_hat": r_hat(x),
        "ess_bulk": ess_bulk(x),
    }


def describe_all(names, draws) -> dict:
    """{name: describe(draws[..., i])} for draws (chains, draws, p)."""
    return {n: describe(draws[..., i]) for i, n in enumerate(names)}


def ess_limit(chains: int, samples: int) -> float:
    """The bulk ESS a shard needs for every reported quantity: ESS_MIN, or 100 per chain
    and half the draws when fewer draws are asked for (short runs)."""
    return float(min(ESS_MIN, max(ESS_PER_CHAIN * chains, 0.4 * chains * samples), 0.5 * chains * samples))


def shard_problems(stats: dict, divergences: int, chains: int, samples: int) -> list[str]:
    """What fails the diagnostics of one shard (empty list: it passes).

    Limits, for every reported quantity in ``stats`` (physics parameters, J and
    gamma_dot at the reference times): R-hat < 1.01 and bulk ESS >= :func:`ess_limit`
    (Vehtari et al. 2021); divergent transitions at most DIVERGENCE_LIMIT of the draws.
    """
    out = []
    need = ess_limit(chains, samples)
    for name, s in stats.items():
        if not np.isfinite(s["r_hat"]) or s["r_hat"] >= R_HAT_LIMIT:
            out.append(f"R-hat {s['r_hat']:.3f} for {name} (limit {R_HAT_LIMIT})")
        if not np.isfinite(s["ess_bulk"]) or s["ess_bulk"] < need:
            out.append(f"bulk ESS {s['ess_bulk']:.0f} for {name} (limit {need:.0f})")
    if divergences > DIVERGENCE_LIMIT * chains * samples:
        out.append(f"{divergences} divergent transitions of {chains * samples} (limit "
                   f"{DIVERGENCE_LIMIT:.1%}; a higher --target-accept takes smaller steps)")
    return out


def shard_discrepancy(shard_w, p_limit: float = DISCREPANCY_P_LIMIT) -> list[dict]:
    """How far each shard's sub-posterior lies from the combination of the others.

    With Gaussian sub-posteriors N(m_k, S_k) of one model, the shards' means scatter
    as the data do: m_k - m_rest ~ N(0, S_k + S_rest), S_rest and m_rest the Gaussian
    product of the other shards (Scott et al. 2016, Eq. 3). The Mahalanobis distance²
    d² = (m_k - m_rest)ᵀ (S_k + S_rest)⁻¹ (m_k - m_rest) is then chi-square with p
    degrees of freedom. A shard whose data are not those of the others (a block of c2
    replaced by noise, a detector glitch in its frames) gives a d² far in the tail,
    whatever its sampler diagnostics say.

    A bad shard also pulls the "rest" of every good shard; so the worst shard is set
    aside while its tail probability is below ``p_limit`` (and at least two shards
    remain), and every shard is compared with the combination of the shards not set
    aside (other than itself).

    Parameters
    ----------
    shard_w : ndarray (K, chains, draws, p)
        Sub-posterior draws in the combination coordinates.
    p_limit : float

    Returns
    -------
    list of K dicts: ``d2``, ``dof``, ``p_value``, ``compared_with`` (shard positions);
    [] for K < 2.
    """
    from scipy.stats import chi2

    shard_w = np.asarray(shard_w, float)
    K, p = shard_w.shape[0], shard_w.shape[-1]
    if K < 2:
        return []
    flat = shard_w.reshape(K, -1, p)
    centre = flat.mean(axis=(0, 1))
    scale = np.sqrt(flat.var(axis=1, ddof=1).mean(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    x = (flat - centre) / scale  # the coordinates span 1e-6 … 1e5 (see combine)
    means = x.mean(axis=1)
    covs = [np.cov(x[k].T) for k in range(K)]
    precisions = [np.linalg.pinv(c) for c in covs]

    def against(k, others):
        P_rest = sum(precisions[j] for j in others)
        S_rest = np.linalg.pinv(P_rest)
        diff = means[k] - S_rest @ sum(precisions[j] @ means[j] for j in others)
        d2 = float(diff @ np.linalg.pinv(covs[k] + S_rest) @ diff)
        return {"d2": d2, "dof": p, "p_value": float(chi2.sf(d2, p)), "compared_with": list(others)}

    kept = list(range(K))
    while len(kept) > 2:
        out = {k: against(k, [j for j in kept if j != k]) for k in kept}
        worst = max(out, key=lambda k: out[k]["d2"])
        if out[worst]["p_value"] >= p_limit:
            break
        kept.remove(worst)
    return [against(k, [j for j in kept if j != k]) for k in range(K)]


# ---------------------------------------------------------------- combination


def combine(shard_w, method: str = "consensus", seed: int = 0) -> np.ndarray:
    """Combine sub-posterior draws in sampling coordinates.

    Parameters
    ----------
    shard_w : ndarray (K, chains, draws, p)
    method : {"consensus", "parametric"}
    seed : int
        For the parametric draws.

    Returns
    -------
    ndarray (chains, draws, p)
    """
    import jax.numpy as jnp
    from numpyro.infer.hmc_util import consensus, parametric

    shard_w = np.asarray(shard_w, float)
    K, C, N, p = shard_w.shape
    if K == 1:
        return shard_w[0].copy()
    flat = shard_w.reshape(K, C * N, p)
    centre = flat.mean(axis=(0, 1))
    scale = np.sqrt(flat.var(axis=1, ddof=1).mean(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    subs = [{"w": jnp.asarray((flat[k] - centre) / scale)} for k in range(K)]
    if method == "consensus":
        out = np.asarray(consensus(subs)["w"])
    elif method == "parametric":
        mean, cov = parametric(subs)
        rng = np.random.default_rng(seed)
        out = rng.multivariate_normal(np.asarray(mean), np.asarray(cov), size=C * N, method="cholesky")
    else:  # checked by the caller; kept for direct use
        raise ValueError(f"unknown combination {method!r}")
    return (out * scale + centre).reshape(C, N, p)


# ---------------------------------------------------------------- derived quantities


def transport_draws(mode: str, theta, t) -> dict:
    """J(t) (Å²/s) and, in laminar_flow, gamma_dot(t) (1/s) for each draw.

    Parameters
    ----------
    mode : {"static", "laminar_flow"}
    theta : ndarray (..., p)
        Physics parameters in ``xpcsfit.parameters.MODES[mode]`` order.
    t : ndarray (n,), s > 0

    Returns
    -------
    dict of ndarrays (..., n): ``J`` and, in laminar_flow, ``gamma_dot``.
    """
    # Parameters first, so that theta[i] is parameter i for every draw, shape (..., 1).
    th = np.moveaxis(np.asarray(theta, float)[..., None, :], -1, 0)
    t = np.asarray(t, float)
    out = {"J": transport_coefficient(th, t)}
    if mode == "laminar_flow":
        out["gamma_dot"] = shear_rate(th, t)
    return out


def bands(values) -> dict:
    """mean, sd, q03, q50, q97 over draws of values (S, n) -> lists of length n."""
    v = np.asarray(values, float)
    q03, q50, q97 = np.quantile(v, [0.03, 0.5, 0.97], axis=0)
    return {"mean": v.mean(axis=0).tolist(), "sd": v.std(axis=0, ddof=1).tolist(),
            "q03": q03.tolist(), "q50": q50.tolist(), "q97": q97.tolist()}


def outside_bounds(flat, lower, upper) -> int:
    """How many draws (S, p) have a parameter outside its bounds (lower, upper: (p,))."""
    lo, hi = np.asarray(lower), np.asarray(upper)
    return int(np.sum(np.any((flat < lo) | (flat > hi), axis=1)))


def identifiability_warnings(names, flat, w) -> list[str]:
    """Warnings for what the combined draws do not determine.

    Pairs of physics parameters (draws ``flat`` (S, p)) correlated beyond ±0.99, and
    an amplitude (D0, gamma_dot_t0) whose position coordinate u (sampling draws ``w``
    (..., p_w), :mod:`xpcsfit.cmc.coordinates`) spreads over more than half its prior sd.
    """
    out = []
    if flat.shape[0] > 2:
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.corrcoef(flat.T)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if abs(c[i, j]) > 0.99:
                    out.append(f"{names[i]} and {names[j]} are not separately determined (posterior "
                               f"correlation {c[i, j]:+.3f}); rely on J(t) and gamma_dot(t)")
    wf = w.reshape(-1, w.shape[-1])
    for col, name in ((0, "D0"), (3, "gamma_dot_t0")):
        if col < wf.shape[1] and name in names:
            sd = wf[:, col].std()
            if sd > 0.5 * PRIOR_SD:
                out.append(f"{name} is determined mostly by its prior (posterior sd of its position "
                           f"coordinate u {sd:.2f}, prior {PRIOR_SD}); its bounds shape its posterior")
    return out


def leave_one_out_effect(shard_w, k: int, method: str, to_theta, names, mode, t_ref, seed=0) -> dict:
    """How much shard k moves the combined posterior: combine without it and compare.

    Returns
    -------
    dict: ``max_shift_sd`` (largest |Δ mean| in combined sd over the physics parameters
    and J/gamma_dot at ``t_ref``), ``worst`` (which quantity), ``sd_ratio_range``
    [min, max] of sd without / sd with, and the per-quantity shifts.
    """
    K = shard_w.shape[0]
    if K < 2:
        return {}
    full = _quantities(combine(shard_w, method, seed), to_theta, names, mode, t_ref)
    rest = _quantities(combine(np.delete(shard_w, k, axis=0), method, seed), to_theta, names, mode, t_ref)
    shifts, ratios = {}, []
    for q, v in full.items():
        sd = v.std(ddof=1)
        if sd > 0:
            shifts[q] = float((rest[q].mean() - v.mean()) / sd)
            ratios.append(float(rest[q].std(ddof=1) / sd))
    worst = max(shifts, key=lambda q: abs(shifts[q])) if shifts else None
    return {
        "max_shift_sd": abs(shifts[worst]) if worst else 0.0,
        "worst": worst,
        "sd_ratio_range": [min(ratios), max(ratios)] if ratios else [1.0, 1.0],
        "shift_sd": shifts,
    }


def _quantities(w, to_theta, names, mode, t_ref) -> dict:
    theta = to_theta(w.reshape(-1, w.shape[-1]))
    out = {n: theta[:, i] for i, n in enumerate(names)}
    for key, v in transport_draws(mode, theta, t_ref).items():
        for j, t in enumerate(t_ref):
            out[f"{key}({t:g} s)"] = v[:, j]
    return out
