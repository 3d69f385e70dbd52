"""The correlated noise of two-time maps: per-bin variance and a correlated-noise inflation,
shared by the least-squares covariance (:mod:`xpcsfit.leastsq.uncertainty`) and the CMC
likelihood (:mod:`xpcsfit.cmc.likelihood`).

Two-time maps have strongly correlated noise: every c2(t1, t2) of a row shares the
speckle pattern of frame t1, so residuals along rows and columns are correlated over
about a decorrelation time (on flow_small q index 8: 0.22 at one frame, 0.05 at 16).
A likelihood that treats the points as independent is then too sharp by the variance
inflation factor of the correlated noise (≈ 50 on flow_small at full resolution): the
reason least-squares standard errors are too narrow.

Here, from the least-squares residuals r at the fit's optimum (one task per tile):

- var_k = mean r² of bin k (the noise variance, fixed: not sampled);
- ρ_q(a, b), the residual autocorrelation at lags (a, b) frames, pooled over the bins
  of each q (within tiles; FFT per tile);
- kappa_q = Σ ρ_q(a, b) over the lags of the thinned lattice (a, b multiples of the
  thinning stride) with |a|, |b| <= W, W = 4 correlation lengths (the lag where the row
  and column autocorrelation has fallen by 1/e), at most 64 frames.

The CMC likelihood then uses var_k · kappa_q; the least-squares covariance inflates by kappa_q. This is the "magnitude adjustment" of a
likelihood that ignores correlation (Ribatet, Cooley & Davison, Stat. Sinica 22, 2012):
exact for the posterior variance of a mean, conservative (slightly too wide) for
parameters whose sensitivity varies over the correlation length. It is a first-order
correction of the width, not a model of the correlation.
"""

from __future__ import annotations

import numpy as np
from scipy.fft import next_fast_len

from xpcsfit.engine.kernel import tile_model
from xpcsfit.parameters import ParameterLayout

MAX_LAG = 64  # frames


def tile_noise_sums(tile, x, layout: ParameterLayout, mode: str, L: float, max_lag: int) -> dict:
    """Worker task: residual sums of one tile at the least-squares optimum x.

    ``tile`` is a loaded :class:`~xpcsfit.engine.kernel.Tile`; ``max_lag`` W in frames.

    Returns
    -------
    dict: ``q_pos``, ``bins`` (n_phi,), ``ss`` (n_phi,) Σ r², ``n`` points (per phi),
    ``acf`` (n_phi, 2W+1, 2W+1) Σ r(i,j)·r(i+a, j+b) and ``pairs`` (2W+1, 2W+1) the
    number of pairs, lags a, b = -W … W (W = ``max_lag``).
    """
    model = tile_model(tile, x, layout, mode, L)
    w = tile.weight
    r = (tile.c2.astype(float) - model) * w[None]
    size = w.shape[0]
    W = int(max_lag)
    P = next_fast_len(size + W + 1)  # any P ≥ size + W + 1 keeps the lags unaliased; 193 (prime) ran 10× slower
    fr = np.fft.rfft2(r, s=(P, P))
    acf = np.fft.irfft2(fr * np.conj(fr), s=(P, P))
    fw = np.fft.rfft2(w, s=(P, P))
    pairs = np.fft.irfft2(fw * np.conj(fw), s=(P, P))
    lags = np.r_[0 : W + 1, P - W : P]  # 0..W then -W..-1
    order = np.r_[W + 1 : 2 * W + 1, 0 : W + 1]  # reorder to -W..W
    acf = acf[:, lags][:, :, lags][:, order][:, :, order]
    pairs = np.rint(pairs[lags][:, lags][order][:, order])
    return {
        "q_pos": int(tile.index[0]),
        "bins": tile.bin_start + np.arange(r.shape[0]),
        "ss": (r * r).sum(axis=(1, 2)),
        "n": np.full(r.shape[0], float(w.sum())),
        "acf": acf,
        "pairs": pairs,
    }


def noise_model(tile_sums: list[dict], n_q: int, n_bins: int, thin: int, max_lag: int) -> dict:
    """Per-bin variance and per-q inflation from the per-tile sums (``tile_sums``:
    :func:`tile_noise_sums` of every tile).

    Returns
    -------
    dict: ``var`` (n_bins,) residual variance, ``sigma`` its square root, ``kappa``
    (n_q,), ``kappa_full`` (n_q,) the inflation at thin = 1 (for reference),
    ``correlation_length`` (n_q,) frames, ``window`` (n_q,) frames, ``rho1`` (n_q,)
    the lag-1 row/column correlation.
    """
    ss = np.zeros(n_bins)
    n = np.zeros(n_bins)
    for p in tile_sums:
        ss[p["bins"]] += p["ss"]
        n[p["bins"]] += p["n"]
    var = ss / np.maximum(n, 1)
    W = int(max_lag)
    num = np.zeros((n_q, 2 * W + 1, 2 * W + 1))
    den = np.zeros((n_q, 2 * W + 1, 2 * W + 1))
    for p in tile_sums:
        num[p["q_pos"]] += (p["acf"] / var[p["bins"]][:, None, None]).sum(axis=0)
        den[p["q_pos"]] += p["pairs"] * len(p["bins"])
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / den, 0.0)
    out = {"var": var, "sigma": np.sqrt(var), "kappa": np.ones(n_q), "kappa_full": np.ones(n_q),
           "correlation_length": np.ones(n_q), "window": np.zeros(n_q), "rho1": np.zeros(n_q)}
    lags = np.arange(-W, W + 1)
    for iq in range(n_q):
        r = rho[iq]
        line = 0.5 * (r[W, W:] + r[W:, W])  # row and column correlation at lags 0..W
        r1 = float(line[1]) if W >= 1 else 0.0
        ell = 1
        if r1 > 0.02:
            below = np.flatnonzero(line[1:] < r1 / np.e)
            ell = int(below[0]) + 1 if below.size else W
        window = min(W, 4 * ell)
        inside = (np.abs(lags) <= window)
        box = inside[:, None] & inside[None, :]
        on_lattice = (lags % thin == 0)
        lattice = box & on_lattice[:, None] & on_lattice[None, :]
        out["kappa"][iq] = max(1.0, float(r[lattice].sum()))
        out["kappa_full"][iq] = max(1.0, float(r[box].sum()))
        out["correlation_length"][iq] = ell
        out["window"][iq] = window
        out["rho1"][iq] = r1
    return out
