"""Starting values from the data: per-bin fits of the time-averaged g2(τ).

The two-time map averaged along its diagonals gives g2(τ) per (q, phi) bin. A
three-parameter fit g2 = offset + contrast·exp(-k τ) per bin (scipy's
least_squares: a small in-memory sub-problem) gives contrast, offset and a decay
rate k. Then, with G = g1² (DESIGN.md §2):

- diffusion alone gives k = q² J, so J ≈ k/q² of the bin least affected by shear
  (the slowest bin of each q); D0 starts at the median over q;
- shear adds decay: for small x, sinc²(x) ≈ exp(-x²/3), so at τ = 1/k the extra rate
  e = k - q²J relates to gamma_dot·|cos(phi0 - phi)| = sqrt(12·e/k)·k/(q·L). A grid
  over phi0 with gamma_dot solved linearly gives both starting values.

Estimates are clipped into the bounds; values given in the config take precedence.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares


def g2_decay_fit(tau: np.ndarray, g2: np.ndarray) -> tuple[float, float, float]:
    """Fit g2(τ) = offset + contrast·exp(-k τ); returns (contrast, offset, k in 1/s).

    Parameters
    ----------
    tau : ndarray (n,)
        Lags, s (> 0).
    g2 : ndarray (n,)
        Time-averaged c2 at those lags.
    """
    tail = g2[-max(1, g2.size // 10):]
    offset0 = float(np.median(tail))
    contrast0 = max(float(g2[0] - offset0), 1e-3)
    below = np.flatnonzero(g2 - offset0 < contrast0 / np.e)
    k0 = 1.0 / tau[below[0]] if below.size else 1.0 / tau[-1]

    def residual(v):
        c, o, logk = v
        return o + c * np.exp(-np.exp(logk) * tau) - g2

    sol = least_squares(residual, [contrast0, offset0, np.log(k0)], method="lm")
    c, o, logk = sol.x
    return float(c), float(o), float(np.exp(logk))


def initial_estimates(lag_sums, lag_counts, q_of_bin, phi_of_bin, dt, mode, L):
    """Data-driven starting values.

    Parameters
    ----------
    lag_sums, lag_counts : ndarray (n_bins, n_lags)
        Σ c2 and point counts per lag in frames (lag 0 = the diagonal, not used).
    q_of_bin, phi_of_bin : ndarray (n_bins,)
        1/Å and degrees.
    dt : float
        s per frame.
    mode : {"static", "laminar_flow"}
    L : float
        Gap, Å.

    Returns
    -------
    dict with "D0", "gamma_dot_t0", "phi0" (flow only), and arrays "contrast",
    "offset" (n_bins,).
    """
    n_bins = lag_sums.shape[0]
    contrast = np.empty(n_bins)
    offset = np.empty(n_bins)
    rate = np.empty(n_bins)
    for b in range(n_bins):
        use = lag_counts[b] > 0
        use[0] = False
        lags = np.flatnonzero(use)
        g2 = lag_sums[b, lags] / lag_counts[b, lags]
        contrast[b], offset[b], rate[b] = g2_decay_fit(lags * dt, g2)
    q_of_bin = np.asarray(q_of_bin, float)
    phi_of_bin = np.asarray(phi_of_bin, float)
    J_bin = rate / q_of_bin**2
    qs = np.unique(q_of_bin)
    J = float(np.median([J_bin[q_of_bin == q].min() for q in qs]))
    out = {"D0": J, "contrast": contrast, "offset": offset}
    if mode == "laminar_flow":
        extra = np.maximum(rate - q_of_bin**2 * J, 0.0)
        a = np.sqrt(12.0 * extra / rate) * rate / (q_of_bin * L)
        best = (np.inf, 0.0, 0.0)
        for phi0 in np.arange(-90.0, 90.0, 0.5):
            c = np.abs(np.cos(np.deg2rad(phi0 - phi_of_bin)))
            gdot = float(a @ c / (c @ c))
            err = float(np.sum((a - gdot * c) ** 2))
            if err < best[0]:
                best = (err, phi0, gdot)
        out["phi0"] = best[1]
        out["gamma_dot_t0"] = best[2]
    return out
