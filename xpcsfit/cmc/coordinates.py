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
    uniformly in t: every frame pair integrates it over [t1, t2]).

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
_NEWTON_STEPS = 3  # from an interpolated start on a 1025-point table: below 1e-15 in e


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
    """

    mode: str
    names: tuple
    lower: tuple
    upper: tuple
    window: tuple

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
        coords = cls(cfg.mode, tuple(names), tuple(lower), tuple(upper), (float(t.min()), float(t.max())))
        for _, exponent, _ in coords.blocks:  # their monotonicity is checked now, before any fit
            coords._table("_h", exponent)
            coords._table("_k", exponent)
        return coords

    # ------------------------------------------------------------ structure

    @property
    def blocks(self):
        out = [("D0", "alpha", "D_offset")]
        if self.mode == "laminar_flow":
            out.append(("gamma_dot_t0", "beta", "gamma_dot_t_offset"))
        return out

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

    def _mean_and_spread(self, e, xp=None):
        """M(e) = mean of t**e and S(e) = rms of (t**e - 1)/e about its mean, over the
        window (same shape as e); smooth through e = 0 (S(0) = rms of ln t). JAX, or
        NumPy with ``xp=np``."""
        if xp is None:
            import jax.numpy as xp
        L = self._log_t()
        e = xp.asarray(e)[..., None]
        small = xp.abs(e) < _SERIES_BELOW
        e_safe = xp.where(small, 1.0, e)
        E = xp.where(small, L + e * L * L / 2 + e * e * L ** 3 / 6, xp.expm1(e_safe * L) / e_safe)
        mean = E.mean(axis=-1)
        spread = xp.sqrt(((E - mean[..., None]) ** 2).mean(axis=-1))
        return 1.0 + e[..., 0] * mean, spread

    def _h(self, e, xp=None):
        """h(e) = Δ / A_m = e·S(e)/M(e): increasing in e, 0 at e = 0."""
        M, S = self._mean_and_spread(e, xp)
        return e * S / M

    def _k(self, e, xp=None):
        """k(e) = Δ / A = e·S(e): increasing in e, 0 at e = 0."""
        return e * self._mean_and_spread(e, xp)[1]

    @functools.lru_cache(maxsize=8)
    def _table(self, kind, exponent):
        """(e grid, h(e) or k(e)) over the exponent's bounds, NumPy (1025 points)."""
        lo, hi = self._b(exponent)
        grid = np.linspace(lo, hi, 1025)
        table = getattr(self, kind)(grid, np)
        if not np.all(np.diff(table) > 0):
            raise ConfigError(f"bounds.{exponent}: the variation of t**{exponent} over the window is not "
                              f"monotone in {exponent} over [{lo}, {hi}]; narrow the bounds")
        return grid, table

    def _solve(self, kind, r, exponent):
        """e with h(e) = r (``kind`` "_h") or k(e) = r ("_k"), clipped into the range
        over the exponent's bounds; JAX.

        Interpolated in the table, then Newton steps outside autodiff, then one last
        step that carries the derivative: de/dr = 1/f'(e) at the root (the implicit
        function theorem), exact to first order, at a fraction of the cost of
        differentiating every step (second derivatives of e, used only to standardise
        the sampling coordinates, are approximate).
        """
        import jax
        import jax.numpy as jnp

        grid, table = self._table(kind, exponent)
        f = getattr(self, kind)
        r = jnp.clip(r, table[0], table[-1])
        e = jax.lax.stop_gradient(jnp.interp(r, table, grid))
        rr = jax.lax.stop_gradient(r)
        for _ in range(_NEWTON_STEPS):
            v, dv = jax.jvp(f, (e,), (jnp.ones_like(e),))
            e = jax.lax.stop_gradient(jnp.clip(e - (v - rr) / dv, grid[0], grid[-1]))
        v, dv = jax.jvp(f, (e,), (jnp.ones_like(e),))
        return e - (v - r) / jax.lax.stop_gradient(dv)

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
        _, h = self._table("_h", exponent)
        m = jnp.where(d > 0, d / h[-1], d / h[0])
        dd = jnp.maximum(y - o_hi, 0.0)
        c = jnp.maximum(y - o_lo, 1e-300)
        amp_low = a_lo * self._mean_and_spread(self._solve("_k", d / a_lo, exponent))[0]
        amp_high = a_hi * self._mean_and_spread(self._solve("_k", d / a_hi, exponent))[0]
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
        e = self._solve("_h", d / A_m, names[1])
        M, _ = self._mean_and_spread(e)
        return A_m / M, e, y - A_m

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
            most = max(abs(float(v)) for v in self._table("_k", exponent)[1][[0, -1]])
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


def _logit(x):
    return float(np.log(x) - np.log1p(-x))


def _normal_logpdf(v, sd):
    return -0.5 * (v / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))
