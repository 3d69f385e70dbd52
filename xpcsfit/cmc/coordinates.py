"""Sampling coordinates of the CMC shards, and the prior placed on them.

Sampling coordinates w
    A power law f(t) = A t**e + o (J(t): D0, alpha, D_offset; gamma_dot(t):
    gamma_dot_t0, beta, gamma_dot_t_offset) is seen by the data only over the measured
    window of frame times, and there they fix two numbers well, its level and its
    variation, and its curvature e only weakly; when e ≈ 0 the amplitude A and the offset
    o are not separately determined at all (A t**e + o ≈ A + o + A·e·ln t). In (A, e, o)
    this is a curved ridge (A·e ≈ const, A + o ≈ const) whose width changes many-fold
    along it: NUTS diverges in its funnel. NUTS therefore samples, per power law,

        y = mean of f over the window                      (the level)
        Δ = A·e·S(e), S(e) = rms over the window of (t**e - 1)/e about its mean
            (= sign(e)·rms variation of f about y: the variation, signed)
        u = position of log A_m, A_m = A·M(e) = y - o the window-mean amplitude,
            inside the interval every bound allows for this (Δ, y), on the logit scale

    and phi0 on the logit scale of its bounds. (Δ, y) are what the data determine
    whatever u is, so the ridge becomes a straight valley along u, and u keeps every
    parameter inside its bounds by construction (no wall to cross; see
    :meth:`Coordinates._interval`). "Over the window" is over N_WINDOW equally spaced
    times between the first and the last frame of the selection (the data constrain f
    uniformly in t: every frame pair integrates it over [t1, t2]), and of f's moving
    average over ``averaged`` of those times (8 of 256, 1/32 of the window, where the
    map stays invertible over the exponent bounds; fewer otherwise, down to 1, f
    itself). Why the average: the data see f only through its integrals over frame
    pairs, so a steep power law (e -> -2) that spikes in the first frames of the window
    is barely seen by them, but its raw rms variation is large; in the raw coordinates
    the shards' Δ had a long tail there (to -0.75·y on flow_small) that NUTS crossed
    with step sizes of 0.08-0.3 and 15-35 leapfrog steps a draw; averaged, the tail is
    gone (step sizes 0.36-0.48, 7.5-10 steps a draw, 2026-12-03).

Prior (weakly informative, inside the bounds), defined on w
    u ~ Normal(0, 1) (log A_m anywhere in its allowed interval, the middle favoured);
    Δ ~ Normal(0, (largest variation the bounds allow)²); y ~ Normal(centre, half-range²)
    of the bounds of A + o; logit(phi0 on its bounds) ~ Normal(0, 1); zero outside the
    bounds. It is a prior on the physics parameters through the one-to-one map w -> θ,
    but not one of independent factors per parameter: placed on w, it does not favour
    small amplitudes the way independent priors on (D0, alpha) do through the Jacobian
    of the map (which pulls an undetermined D0 to its lower bound and alpha to its
    bounds). The prior density of w is raised to 1/K in each of the K shards (Scott et
    al., 2016, Eq. 2), in w, the space where the shards are combined: the product of the
    K shard targets is the full posterior of w, and the tempered Normal factors multiply
    back exactly even under the Gaussian consensus rule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from xpcsfit.errors import ConfigError
from xpcsfit.parameters import MODES

PRIOR_SD = 1.0  # sd of u (amplitude position, logit scale) and of logit(phi0)
N_WINDOW = 256  # times over the window at which the level and the variation are taken
_SERIES_BELOW = 1e-5  # |e| below which (t**e - 1)/e is its Taylor series (0/0 at e = 0)
# Window times in the moving average the level and the variation are taken of, the
# largest of these that keeps the coordinates invertible over the exponent bounds.
AVERAGED = (N_WINDOW // 32, N_WINDOW // 64, N_WINDOW // 128, 1)
TABLE_POINTS = 1025  # exponent grid of the window functionals' tables


@dataclass(frozen=True)
class Coordinates:
    """Map between physics parameters θ and NUTS's sampling coordinates w.

    Parameters
    ----------
    mode : {"static", "laminar_flow"}
    names : tuple of str
        Physics parameter names in θ order (``xpcsfit.parameters.MODES[mode]``).
    lower, upper : tuple of float
        Bounds of each physics parameter (same order); D0 and gamma_dot_t0 need
        lower > 0, alpha and beta lower < 0 < upper.
    window : tuple of float
        (first, last) frame time of the selection, s, first < last.
    averaged : int
        Window times (of N_WINDOW) in the moving average of f whose mean and rms
        variation are the level and the variation (1: f itself); see the module notes.
    """

    mode: str
    names: tuple
    lower: tuple
    upper: tuple
    window: tuple
    averaged: int = 1

    @classmethod
    def from_config(cls, cfg, t) -> "Coordinates":
        """The coordinates of a :class:`~xpcsfit.config.FitConfig`'s mode and bounds
        over the frame times ``t`` (n,) s of the selection.

        Raises
        ------
        ConfigError
            A lower bound of D0 or gamma_dot_t0 that is not positive (u is a position of
            a logarithm), exponent bounds that do not contain 0, or so wide that the
            window's variation of t**e is not monotone in e over them.
        """
        names = MODES[cfg.mode]
        lower, upper = [], []
        for n in names:
            lo, hi = cfg.bound(n)
            if n in ("D0", "gamma_dot_t0") and lo <= 0:
                raise ConfigError(f"bounds.{n}: cmc needs a positive lower bound (its prior is on log {n}), "
                                  f"got {lo}")
            if n in ("alpha", "beta") and not lo < 0 < hi:
                raise ConfigError(f"bounds.{n}: cmc needs bounds around 0, got [{lo}, {hi}]")
            lower.append(float(lo))
            upper.append(float(hi))
        t = np.asarray(t, float)
        window = (float(t.min()), float(t.max()))
        for averaged in AVERAGED:  # invertibility is checked now, before any fit
            coords = cls(cfg.mode, tuple(names), tuple(lower), tuple(upper), window, averaged)
            failing = [exponent for _, exponent, _ in coords.blocks if not coords._invertible(exponent)]
            if not failing:
                return coords
        n = failing[0]
        raise ConfigError(f"bounds.{n}: the variation of t**{n} over the window is not monotone in {n} over "
                          f"[{coords._b(n)[0]}, {coords._b(n)[1]}]; narrow the bounds")

    @property
    def averaged_seconds(self) -> float:
        """Length of the moving average, s (``averaged`` of the N_WINDOW intervals)."""
        return (self.window[1] - self.window[0]) * self.averaged / N_WINDOW

    # ------------------------------------------------------------ structure

    @property
    def blocks(self):
        out = [("D0", "alpha", "D_offset")]
        if self.mode == "laminar_flow":
            out.append(("gamma_dot_t0", "beta", "gamma_dot_t_offset"))
        return out

    @property
    def level_names(self) -> list[str]:
        """The sampling coordinates that are a transport coefficient's level over the
        window (J's, and gamma_dot's in laminar_flow): what the data determine best, and
        what the choice of the number of shards is judged by."""
        return [n for n in self.w_names if n.endswith("_window_mean")]

    @property
    def w_names(self) -> list[str]:
        out = ["u_D0", "J_variation", "J_window_mean"]
        if self.mode == "laminar_flow":
            out += ["u_gamma_dot_t0", "gamma_dot_variation", "gamma_dot_window_mean", "logit_phi0"]
        return out

    def _b(self, name):
        i = self.names.index(name)
        return self.lower[i], self.upper[i]

    def _log_t(self) -> np.ndarray:
        lo, hi = self.window
        edges = np.linspace(lo, hi, N_WINDOW + 1)
        return np.log(0.5 * (edges[1:] + edges[:-1]))  # interval midpoints: > 0 even from t = 0

    # ------------------------------------------------------------ the window functionals

    def _window_functionals(self, e):
        """M(e) = mean of t**e, S(e) = rms of (t**e - 1)/e about its mean over the
        window, both of their moving averages over ``averaged`` window times, and their
        derivatives in e: (M, M', S, S'), NumPy, each the shape of e. Smooth through
        e = 0 (S(0) = rms of ln t)."""
        L = self._log_t()
        e = np.asarray(e, float)[..., None]
        small = np.abs(e) < _SERIES_BELOW
        e_safe = np.where(small, 1.0, e)
        te = np.exp(e * L)
        E = np.where(small, L + e * L * L / 2 + e * e * L ** 3 / 6, np.expm1(e_safe * L) / e_safe)
        dE = np.where(small, L * L / 2 + e * L ** 3 / 3, (te * L - E) / e_safe)
        teL, te, E, dE = (self.averaged_over_window(v) for v in (te * L, te, E, dE))
        Ec = E - E.mean(axis=-1, keepdims=True)
        dEc = dE - dE.mean(axis=-1, keepdims=True)
        S = np.sqrt((Ec * Ec).mean(axis=-1))
        return te.mean(axis=-1), teL.mean(axis=-1), S, (Ec * dEc).mean(axis=-1) / S

    def averaged_over_window(self, f) -> np.ndarray:
        """f's moving average over the window, the curve whose mean is the level y and
        whose rms variation is |Δ|.

        Parameters
        ----------
        f : ndarray (..., N_WINDOW)
            Values at the window times ``exp(_log_t())``.

        Returns
        -------
        ndarray (..., N_WINDOW - averaged + 1)
        """
        return _moving_average(np.asarray(f, float), self.averaged)

    def _mean_and_spread(self, e):
        """(M(e), S(e)) of :meth:`_window_functionals`, NumPy."""
        M, _, S, _ = self._window_functionals(e)
        return M, S

    @functools.lru_cache(maxsize=8)
    def _table(self, exponent):
        """The window functionals tabulated over the exponent's bounds, NumPy.

        Returns a dict of (TABLE_POINTS,) arrays: ``e`` (the grid), ``M``, ``h`` =
        e·S/M (= Δ / A_m) and ``k`` = e·S (= Δ / A), each with its derivative in e
        (``dM``, ``dh``, ``dk``). h and k increase with e (checked: the coordinates need
        them invertible), 0 at e = 0.
        """
        lo, hi = self._b(exponent)
        e = np.linspace(lo, hi, TABLE_POINTS)
        M, dM, S, dS = self._window_functionals(e)
        table = {"e": e, "M": M, "dM": dM, "h": e * S / M, "dh": (S + e * dS) / M - e * S * dM / (M * M),
                 "k": e * S, "dk": S + e * dS}
        return table

    def _invertible(self, exponent) -> bool:
        """Whether h and k increase over the exponent's bounds (the map needs their inverses)."""
        table = self._table(exponent)
        return bool(np.all(table["dh"] > 0) and np.all(table["dk"] > 0)
                    and np.all(np.diff(table["h"]) > 0) and np.all(np.diff(table["k"]) > 0))

    def _M(self, e, exponent):
        """M(e) (JAX), interpolated in the table: C¹, no pass over the window in a gradient."""
        t = self._table(exponent)
        return _hermite(e, t["e"], t["M"], t["dM"])

    def _solve(self, kind, r, exponent):
        """e with h(e) = r (``kind`` "h") or k(e) = r ("k"), clipped into the range
        over the exponent's bounds; JAX.

        The inverse is the cubic Hermite interpolant through the table's points (r_i,
        e_i) with slopes 1/f'(e_i): C¹ in r (leapfrog steps meet no kink), exact to
        ~1e-12 in e with the table's 1025 points, and a few operations instead of
        Newton steps over the window in every gradient.
        """
        t = self._table(exponent)
        return _hermite(r, t[kind], t["e"], 1.0 / t["d" + kind])

    def _interval(self, d, y, names):
        """(a, b): log of the smallest and largest window-mean amplitude A_m allowed by
        every bound for variation d and level y.

        A_m >= d/h(e_hi) (d > 0) or d/h(e_lo) (d < 0): the exponent inside its bounds;
        A_m >= y - o_hi and A_m <= y - o_lo: the offset y - A_m inside its bounds;
        A_lo·M(e_lo*) <= A_m <= A_hi·M(e_hi*): the amplitude A = A_m/M(e) inside its
        bounds (A grows with A_m at fixed d), e_lo* and e_hi* the exponents at which the
        amplitude is on its bound, k(e) = d/A_lo and d/A_hi. The maxima are a root of a
        sum of squares and the minima a soft minimum of order 16: smooth, so that NUTS's
        leapfrog steps meet no kink where d changes sign, and inside the exact limits
        (by at most a factor √3 and 2^(1/16)), so the prior is zero on thin slivers next
        to the bounds.
        """
        import jax.numpy as jnp

        amp, exponent, offset = names
        a_lo, a_hi = self._b(amp)
        o_lo, o_hi = self._b(offset)
        h = self._table(exponent)["h"]
        m = jnp.where(d > 0, d / h[-1], d / h[0])
        dd = jnp.maximum(y - o_hi, 0.0)
        c = jnp.maximum(y - o_lo, 1e-300)
        amp_low = a_lo * self._M(self._solve("k", d / a_lo, exponent), exponent)
        amp_high = a_hi * self._M(self._solve("k", d / a_hi, exponent), exponent)
        k = 16.0
        a = 0.5 * jnp.log(amp_low ** 2 + m * m + dd * dd)
        b = -jnp.logaddexp(-k * jnp.log(amp_high), -k * jnp.log(c)) / k
        # Where the bounds leave no amplitude at all (a >= b) the prior is zero; keep the
        # map defined there (log_prior's bound checks return -inf).
        b = jnp.maximum(b, a + 1e-9)
        return a, b

    # ------------------------------------------------------------ the map

    def _block(self, u, d, y, names):
        """(A, e, o) of one power law from its (u, Δ, y); JAX, any shape."""
        import jax
        import jax.numpy as jnp

        a, b = self._interval(d, y, names)
        A_m = jnp.exp(a + (b - a) * jax.nn.sigmoid(u))
        e = self._solve("h", d / A_m, names[1])
        return A_m / self._M(e, names[1]), e, y - A_m

    def to_theta(self, w):
        """θ (…, p) from w (…, p); JAX-traceable."""
        import jax
        import jax.numpy as jnp

        columns = []
        for k, names in enumerate(self.blocks):
            columns += list(self._block(w[..., 3 * k], w[..., 3 * k + 1], w[..., 3 * k + 2], names))
        if self.mode == "laminar_flow":
            lo, hi = self._b("phi0")
            columns.append(lo + (hi - lo) * jax.nn.sigmoid(w[..., 6]))
        return jnp.stack(columns, axis=-1)

    def from_theta(self, theta, margin: float = 0.02) -> np.ndarray:
        """w of θ (p,), moved inside the bounds (by ``margin`` of each interval).

        An amplitude on its bound (D0 = 1e5 is a common least-squares answer when D0
        and D_offset are not separately determined) becomes one inside; Δ and y are
        kept, so J(t) over the window changes only at second order.
        """
        th = dict(zip(self.names, np.asarray(theta, float)))
        w = []
        for amp, exponent, offset in self.blocks:
            e_lo, e_hi = self._b(exponent)
            o_lo, o_hi = self._b(offset)
            e = float(np.clip(th[exponent], e_lo + margin * (e_hi - e_lo), e_hi - margin * (e_hi - e_lo)))
            o = float(np.clip(th[offset], o_lo + margin * (o_hi - o_lo), o_hi - margin * (o_hi - o_lo)))
            M, S = (float(v) for v in self._mean_and_spread(e))
            A_m = th[amp] * M
            d, y = th[amp] * e * S, A_m + o
            a, b = (float(v) for v in self._interval(d, y, (amp, exponent, offset)))
            x = np.clip((np.log(max(A_m, 1e-300)) - a) / (b - a), margin, 1 - margin)
            w += [_logit(x), d, y]
        if self.mode == "laminar_flow":
            lo, hi = self._b("phi0")
            w.append(_logit(np.clip((th["phi0"] - lo) / (hi - lo), margin, 1 - margin)))
        return np.asarray(w, float)

    # ------------------------------------------------------------ the prior

    def prior_scales(self) -> dict:
        """Centre and sd of the Normal prior of each sampling coordinate (see log_prior)."""
        out = {}
        for k, (amp, exponent, offset) in enumerate(self.blocks):
            a_lo, a_hi = self._b(amp)
            o_lo, o_hi = self._b(offset)
            names = self.w_names[3 * k: 3 * k + 3]
            most = max(abs(float(v)) for v in self._table(exponent)["k"][[0, -1]])
            out[names[0]] = (0.0, PRIOR_SD)
            out[names[1]] = (0.0, most * a_hi)
            out[names[2]] = (0.5 * (a_lo + a_hi + o_lo + o_hi), 0.5 * (a_hi - a_lo + o_hi - o_lo))
        if self.mode == "laminar_flow":
            out["logit_phi0"] = (0.0, PRIOR_SD)
        return out

    def log_prior(self, w, theta):
        """log prior density of w (untempered), given ``theta = to_theta(w)`` (the caller
        has it already for the likelihood: the map is the costly part); JAX.

        Independent Normals on the sampling coordinates (:meth:`prior_scales`): u ~
        N(0, 1) (the position of log A_m in its allowed interval, on the logit scale),
        Δ ~ N(0, (k_max·A_hi)²) (the largest variation the bounds allow), y ~ N(centre,
        half-range²) of A + o, logit(phi0) ~ N(0, 1); zero outside the bounds (every
        parameter stays inside its bounds by construction wherever the bounds leave an
        amplitude for (Δ, y) at all).
        """
        import jax.numpy as jnp

        lp = 0.0
        for name, (c, sd) in self.prior_scales().items():
            lp = lp + _normal_logpdf(w[..., self.w_names.index(name)] - c, sd)
        inside = jnp.all((theta >= jnp.asarray(self.lower)) & (theta <= jnp.asarray(self.upper)), axis=-1)
        return lp + jnp.where(inside, 0.0, -jnp.inf)


def _moving_average(a, n):
    """Means of n consecutive values along the last axis ("valid": len - n + 1 of them)."""
    c = np.cumsum(np.concatenate([np.zeros(a.shape[:-1] + (1,)), a], axis=-1), axis=-1)
    return (c[..., n:] - c[..., :-n]) / n


def _hermite(x, xs, ys, slopes):
    """Cubic Hermite interpolant through (xs[i], ys[i]) with slopes ``slopes[i]`` at x
    (JAX, any shape; xs increasing NumPy, x clipped into [xs[0], xs[-1]])."""
    import jax.numpy as jnp

    xs, ys, slopes = (jnp.asarray(v) for v in (xs, ys, slopes))
    x = jnp.clip(x, xs[0], xs[-1])
    i = jnp.clip(jnp.searchsorted(xs, x, side="right") - 1, 0, len(xs) - 2)
    x0, x1 = xs[i], xs[i + 1]
    y0, y1 = ys[i], ys[i + 1]
    w = x1 - x0
    m0, m1 = slopes[i] * w, slopes[i + 1] * w
    s = (x - x0) / w
    s2, s3 = s * s, s * s * s
    return (2 * s3 - 3 * s2 + 1) * y0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * y1 + (s3 - s2) * m1


def _logit(x):
    return float(np.log(x) - np.log1p(-x))


def _normal_logpdf(v, sd):
    return -0.5 * (v / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))
