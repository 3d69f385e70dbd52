"""Noise weights, goodness of fit and the correlated-noise covariance of a fit (DESIGN.md §6a).

**Noise level per bin** (:func:`noise_levels`). From the start-value pass (no pass of its
own): for bin k, the pooled variance of c2 about its mean along each diagonal,

    σ_k² = Σ_τ Σ_{t1} (c2(t1, t1+τ) − ḡ2_k(τ))² / Σ_τ (n_τ − 1),

ḡ2_k(τ) the time-averaged g2 at lag τ (the mean of the diagonal), n_τ its points. This is
the residual variance about a non-parametric stationary model (a free value per lag), so
it does not depend on the fitted model: a model that fits as well as the free per-lag
curve has Σ r²/σ² ≈ n, one that does not has more. (For an aging sample, whose c2
changes along a diagonal, σ_k² also takes up that change, and the goodness of fit is
judged leniently.) The fit minimises Σ_k w_k Σ r² with w_k = 1/σ_k² (weighted least
squares through the tile kernel), so a bin counts by its noise in a joint fit.

**Goodness of fit.** reduced_chi2 = Σ_k w_k Σ r² / (n − P): ≈ 1 for a model that describes
the data (slightly above 1, by about the correlation length over the number of frames,
because the per-lag mean absorbs some correlated noise). Above :data:`MISFIT_LIMIT` the
fit warns of a model misfit.

**Covariance** (:func:`inflated_covariance`, the default, ``covariance: inflated``).
The noise of a two-time map is correlated: points that share a frame share its speckle
fluctuations, so c2 noise is correlated over about a decorrelation time of the sample
along rows, columns and diagonals. The naive weighted covariance (JᵀWJ)⁻¹·χ²/(n − P)
assumes independent points and is too small by about the number of points each point
is correlated with. With the least-squares scores s_i = w_i J_iᵀ r_i the exact
(sandwich) covariance is V = H⁻¹ M H⁻¹, H = JᵀWJ, M = Σ_i Σ_j Cov(s_i, s_j). With
Cov(r_i, r_j) = σ_i σ_j ρ(i − j) and J smooth over the correlation lags,
M ≈ Σ_q κ_q H_q with the inflation

    κ_q = Σ_{(a, b) in the lag window} ρ_q(a, b),

ρ_q the residual autocorrelation at lags (a, b) frames of q's bins (pooled over them):
the magnitude adjustment of a likelihood that ignores the correlation (Ribatet, Cooley &
Davison 2012, Stat. Sinica 22, 813, Sect. 3; Chandler & Bate 2007), the inflation the CMC
uses too (:mod:`xpcsfit.noise`: ρ from per-tile FFTs of the residuals, window
4 correlation lengths, at most 64 frames). Then

    V = H⁻¹ (Σ_q κ_q H_q) H⁻¹ · χ²/(n − P),

which for one q is κ times the naive covariance; H_q are the normal equations of q's
tiles alone. The approximation is exact for a quantity whose sensitivity is constant over
the correlation lags and conservative (slightly too wide) where it varies; it holds for
the scale of the errors, not for the shape of the correlation. One extra pass over the
tiles at the optimum gives ρ and H_q (:func:`tile_inflation_sums`). This was chosen over a
cluster-robust sandwich M = Σ_c Σ_c' S_c S_c'ᵀ from block score sums (Conley 1999;
Liang & Zeger 1986 with tiles as clusters): with decorrelation lags of tens of frames a
300–500-frame map holds only a handful of independent clusters, and on the speckle
simulations that estimate was erratic (its standard errors from 1× to 40× the naive
ones from file to file), while κ_q, an average over many lag pairs, is stable.
``covariance: naive`` gives (JᵀWJ)⁻¹·χ²/(n − P), for comparison.
"""

from __future__ import annotations

import numpy as np

from xpcsfit.engine.kernel import tile_block_sums
from xpcsfit.leastsq.results import covariance_from_normal_equations
from xpcsfit.noise import noise_model, tile_noise_sums

# Residual autocorrelation lags (frames) the inflation may sum over (the CMC's limit).
MAX_LAG = 64

NOISE_ESTIMATOR = ("per bin: pooled variance of c2 about its mean along each diagonal (lag), "
                   "from the start-value pass")
INFLATED_METHOD = ("naive x kappa_q: residual lag-autocorrelation inflation per q, H^-1 (sum_q kappa_q H_q) H^-1 "
                   "chi2/dof (Ribatet, Cooley & Davison 2012)")
NAIVE_METHOD = "naive (J^T W J)^-1 chi2/dof: independent points assumed"
MISFIT_LIMIT = 1.3


def noise_levels(sums: np.ndarray, counts: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """σ_k per bin, (n_bins,), from the per-lag sums of the start-value pass (see module doc).

    Parameters
    ----------
    sums, counts, squares : ndarray (n_bins, n_lags)
        Σ c2, number of points and Σ c2² per bin and lag
        (:meth:`xpcsfit.engine.evaluator.TileEvaluator.lag_sums`).

    A bin without noise (model data) gets 1e-6 of the largest σ, so that weights stay
    finite; if no bin has noise, every σ is 1 (unweighted).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        within = np.where(counts >= 2, squares - sums**2 / np.maximum(counts, 1), 0.0)
    dof = np.maximum(counts - 1, 0).sum(axis=1)
    var = np.maximum(within.sum(axis=1), 0.0) / np.maximum(dof, 1)
    top = var.max(initial=0.0)
    if not top > 0:
        return np.ones(var.shape)
    return np.sqrt(np.maximum(var, 1e-12 * top))


def tile_inflation_sums(tile, x, layout, mode: str, L: float, bin_weight, max_lag: int) -> tuple:
    """Worker task of the covariance pass: (q position, residual lag sums of
    :func:`xpcsfit.noise.tile_noise_sums`, the tile's weighted
    :func:`~xpcsfit.engine.kernel.tile_block_sums` — None for a fit of one q, whose H_q
    is the solver's H) at the optimum x."""

    per_q = tile_block_sums(tile, x, layout, mode, L, bin_weight) if layout.n_q > 1 else None
    return tile.index[0], tile_noise_sums(tile, x, layout, mode, L, max_lag), per_q


def inflation(per_tile: list, n_q: int, n_bins: int, max_lag: int) -> tuple[np.ndarray, list, dict]:
    """κ_q (n_q,), the summed block sums of each q, and the CMC noise record, from the
    :func:`tile_inflation_sums` of every tile."""

    record = noise_model([n for _, n, _ in per_tile], n_q, n_bins, 1, max_lag)
    by_q = [None] * n_q
    for iq, _, sums in per_tile:
        if sums is not None:
            by_q[iq] = sums if by_q[iq] is None else by_q[iq] + sums
    return np.asarray(record["kappa_full"], float), by_q, record


def inflated_covariance(jtj: np.ndarray, jtj_by_q: list, kappa: np.ndarray, scale: float) -> np.ndarray:
    """V = H⁻¹ (Σ_q κ_q H_q) H⁻¹ · scale (P, P) (see the module doc); H = ``jtj``, H_q
    ``jtj_by_q``, scale = χ²/(n − P). H⁻¹ is the eigen-floored inverse of
    :func:`~xpcsfit.leastsq.results.covariance_from_normal_equations`."""
    if len(kappa) == 1:  # H₁ = H: exactly κ times the naive covariance
        cov, _ = covariance_from_normal_equations(jtj, scale, 1)
        return float(kappa[0]) * cov
    # Σ κ_q H_q = H + Σ (κ_q − 1) H_q: the naive covariance (with its eigenvalue floor
    # for undetermined directions, where H⁻¹HH⁻¹ would not be H⁻¹) plus the excess.
    h_inverse, _ = covariance_from_normal_equations(jtj, 1.0, 1)
    excess = sum((k - 1.0) * h for k, h in zip(kappa, jtj_by_q))
    V = (h_inverse + h_inverse @ excess @ h_inverse) * scale
    return 0.5 * (V + V.T)


def fit_covariance(state, evaluator, ds, cfg, layout, chi2: float, dof: int):
    """Covariance of the final x (the config's ``covariance``), its warnings, and the
    ``noise`` record of fit.json. ``state`` the final SolverState, ``evaluator`` the fit's
    (its last pass at ``state.x``), ``chi2`` = Σ w r², ``dof`` = n − P. The inflated
    covariance costs one pass over the tiles (residual autocorrelation and per-q normal
    equations at x)."""
    naive, warn = covariance_from_normal_equations(state.ne.jtj, chi2, dof)
    weight = evaluator.bin_weight if evaluator.bin_weight is not None else np.ones(layout.n_bins)
    _, sums = evaluator.last_block_sums
    n_bin = sums.C[:, 1, 1] / weight
    ratio = sums.rss / np.maximum(n_bin, 1)  # Σ w r² / n per bin (rss is weighted)
    noise = {"estimator": NOISE_ESTIMATOR, "sigma": (weight ** -0.5).reshape(layout.n_q, layout.n_phi),
             "reduced_chi2_per_bin": ratio.reshape(layout.n_q, layout.n_phi), "covariance_method": NAIVE_METHOD}
    if chi2 / dof > MISFIT_LIMIT:
        worst = int(np.argmax(ratio))
        warn.append(f"model misfit: reduced chi2 = {chi2 / dof:.3g} > {MISFIT_LIMIT} (the residuals exceed the "
                    f"noise level of the data; worst bin q index {worst // layout.n_phi}, phi index "
                    f"{worst % layout.n_phi}: {ratio[worst]:.3g}); the uncertainties assume the model is right")
    if cfg.covariance == "naive":
        return naive, warn, noise
    with evaluator.phase("covariance"):
        per_tile = evaluator.map_tiles("covariance", tile_inflation_sums, state.x, layout, cfg.mode,
                                       evaluator.L, evaluator.bin_weight, MAX_LAG)
    kappa, by_q, record = inflation(per_tile, layout.n_q, layout.n_bins, MAX_LAG)
    by_q = [b.normal_equations().jtj for b in by_q] if layout.n_q > 1 else []
    cov = inflated_covariance(state.ne.jtj, by_q, kappa, chi2 / dof)
    noise |= {"covariance_method": INFLATED_METHOD, "kappa": kappa.tolist(),
              "correlation_length_frames": record["correlation_length"].tolist(),
              "lag_window_frames": record["window"].tolist()}
    return cov, warn, noise
