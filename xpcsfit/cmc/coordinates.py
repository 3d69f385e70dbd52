"""Sampling coordinates of the CMC shards, and the prior placed on them.

Sampling coordinates w
    With alpha ≈ 0 the data fix J(t) = D0 t**alpha + D_offset over the window but not
    D0, alpha and D_offset separately: in (D0, alpha) the posterior is a thin curved
    ridge (D0·alpha ≈ const) that NUTS cannot cross. NUTS therefore samples

        w = (u_D0, s_J, y_J [, u_g0, s_g, y_g, phi0])

    with s_J = alpha·D0 = dJ/dln t and y_J = D0 + D_offset = J, both at t = 1 s, and
    u_D0 the position of log D0 (logit scale) inside the interval that every bound
    allows for this (s_J, y_J); likewise for the shear rate (gamma_dot_t0, beta,
    gamma_dot_t_offset). The data determine (s, y) whatever the amplitude is, so the
    ridge becomes a straight valley along u, and no bound is ever crossed (see
    :class:`Coordinates`).

Prior (weakly informative, inside the bounds), defined on w
    u ~ Normal(0, 1) (log D0 anywhere in its allowed interval, the middle favoured);
    s ~ Normal(0, (largest slope the bounds allow)²); y ~ Normal(centre, half-range²)
    of the bounds of D0 + D_offset; times a logit-normal factor (logit sd 1) on each
    exponent (alpha, beta) and on phi0, inside their bounds; zero outside the bounds.
    It is a prior on the physics parameters (through the one-to-one map w -> θ), but
    not one of independent factors per parameter: placed on w, it does not favour
    small amplitudes the way independent priors on (D0, alpha) do through the Jacobian
    1/D0 (the prior volume of alpha at fixed slope), which pulls the posterior of an
    undetermined D0 to its lower bound and alpha to its bounds. The prior density of
    w is raised to 1/K in each of the K shards (Scott et al., 2016, Eq. 2), in w, the
    space where the shards are combined: the product of the K shard targets is the
    full posterior of w, and for the Normal factors the tempered sub-priors multiply
    back exactly even under the Gaussian consensus rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpcsfit.errors import ConfigError
from xpcsfit.parameters import MODES

PRIOR_SD = 1.0  # sd of u (amplitude position, logit scale) and of the exponent/phi0 logits


@dataclass(frozen=True)
class Coordinates:
    """Map between physics parameters θ and NUTS's sampling coordinates w.

    Per power law (A t**e + o: (D0, alpha, D_offset) and, in laminar_flow,
    (gamma_dot_t0, beta, gamma_dot_t_offset)) three coordinates (u, s, y):

        s = e·A    (the slope d/dln t at t = 1 s)      y = A + o  (the value at t = 1 s)
        log A = a + (b - a)·sigmoid(u)

    with [a, b] the log-amplitudes that every bound allows for this (s, y) (see
    ``_interval``): the exponent s/A and the offset y - A stay inside their bounds by
    construction, for any u. Without it the exponent bound cuts the allowed slope
    down in proportion to A, and the offset bound cuts the amplitude off at a wall:
    funnels and walls where NUTS diverges. phi0 is sampled as it is.

    Parameters
    ----------
    mode : {"static", "laminar_flow"}
    names : tuple of str
        Physics parameter names in θ order (``xpcsfit.parameters.MODES[mode]``).
    lower, upper : tuple of float
        Bounds of each physics parameter (same order); D0 and gamma_dot_t0 need
        lower > 0, alpha and beta lower < 0 < upper.
    """

    mode: str
    names: tuple
    lower: tuple
    upper: tuple

    @classmethod
    def from_config(cls, cfg) -> "Coordinates":
        """The coordinates of a :class:`~xpcsfit.config.FitConfig`'s mode and bounds.

        Raises
        ------
        ConfigError
            A lower bound of D0 or gamma_dot_t0 that is not positive (the prior is on
            their logarithm).
        """
        names = MODES[cfg.mode]
        lower, upper = [], []
        for n in names:
            lo, hi = cfg.bound(n)
            if n in ("D0", "gamma_dot_t0") and lo <= 0:
                raise ConfigError(f"bounds.{n}: cmc needs a positive lower bound (its prior is on log {n}), "
                                  f"got {lo}")
            lower.append(float(lo))
            upper.append(float(hi))
        return cls(cfg.mode, tuple(names), tuple(lower), tuple(upper))

    @property
    def blocks(self):
        out = [("D0", "alpha", "D_offset")]
        if self.mode == "laminar_flow":
            out.append(("gamma_dot_t0", "beta", "gamma_dot_t_offset"))
        return out

    @property
    def w_names(self) -> list[str]:
        out = ["u_D0", "dJ_dlnt_at_1s", "J_at_1s"]
        if self.mode == "laminar_flow":
            out += ["u_gamma_dot_t0", "dgamma_dot_dlnt_at_1s", "gamma_dot_at_1s", "phi0"]
        return out

    def _b(self, name):
        i = self.names.index(name)
        return self.lower[i], self.upper[i]

    def _interval(self, s, y, names):
        """(a, b): log of the smallest and largest amplitude A allowed by every bound.

        A >= A_lo, A >= m(s) (the exponent s/A inside its bounds: m = s/e_hi for s > 0,
        s/e_lo for s < 0) and A >= y - o_hi; A <= A_hi and A <= y - o_lo (the offset
        y - A inside its bounds). The maxima and minima are smooth (a root of a sum of
        squares; a soft minimum of order 16), continuously differentiable so that
        NUTS's leapfrog steps meet no kink where the slope s changes sign. They lie
        inside the exact limits (by at most a factor √3 and 2^(1/16)), so the prior is
        zero on thin slivers next to the bounds.
        """
        import jax.numpy as jnp

        amp, exponent, offset = names
        a_lo, a_hi = self._b(amp)
        e_lo, e_hi = self._b(exponent)
        o_lo, o_hi = self._b(offset)
        m = jnp.where(s > 0, s / e_hi, s / e_lo)
        d = jnp.maximum(y - o_hi, 0.0)
        a = 0.5 * jnp.log(a_lo * a_lo + m * m + d * d)
        c = jnp.maximum(y - o_lo, 1e-300)
        k = 16.0
        b = -jnp.logaddexp(-k * np.log(a_hi), -k * jnp.log(c)) / k
        # Where the bounds leave no amplitude at all (a >= b) the prior is zero; keep the
        # map defined there (the prior's bound checks return -inf).
        b = jnp.maximum(b, a + 1e-9)
        return a, b

    def _block(self, w3, names):
        """(A, e, o, log dlogA/du) of one power law from its (u, s, y)."""
        import jax
        import jax.numpy as jnp

        u, s, y = w3
        a, b = self._interval(s, y, names)
        logA = a + (b - a) * jax.nn.sigmoid(u)
        A = jnp.exp(logA)
        log_du = jnp.log(b - a) + jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u)
        return A, s / A, y - A, logA, log_du

    def to_theta(self, w):
        """θ (…, p) from w (…, p); JAX-traceable."""
        import jax.numpy as jnp

        columns = []
        for k, names in enumerate(self.blocks):
            A, e, o, _, _ = self._block((w[..., 3 * k], w[..., 3 * k + 1], w[..., 3 * k + 2]), names)
            columns += [A, e, o]
        if self.mode == "laminar_flow":
            columns.append(w[..., 6])
        return jnp.stack(columns, axis=-1)

    def from_theta(self, theta, margin: float = 0.02) -> np.ndarray:
        """w of θ (p,), moved inside the bounds (by ``margin`` of each interval).

        An amplitude on its bound (D0 = 1e5 is a common least-squares answer when D0
        and D_offset are not separately determined) becomes one inside; s and y are
        kept, so J(t) changes only at second order.
        """
        th = dict(zip(self.names, np.asarray(theta, float)))
        w = []
        for amp, exponent, offset in self.blocks:
            e_lo, e_hi = self._b(exponent)
            o_lo, o_hi = self._b(offset)
            A = th[amp]
            e = float(np.clip(th[exponent], e_lo + margin * (e_hi - e_lo), e_hi - margin * (e_hi - e_lo)))
            s = e * A
            y = A + float(np.clip(th[offset], o_lo + margin * (o_hi - o_lo), o_hi - margin * (o_hi - o_lo)))
            a, b = (float(v) for v in self._interval(s, y, (amp, exponent, offset)))
            x = np.clip((np.log(max(A, 1e-300)) - a) / (b - a), margin, 1 - margin)
            w += [_logit(x), s, y]
        if self.mode == "laminar_flow":
            lo, hi = self._b("phi0")
            w.append(float(np.clip(th["phi0"], lo + margin * (hi - lo), hi - margin * (hi - lo))))
        return np.asarray(w, float)

    def prior_scales(self) -> dict:
        """Centre and sd of the Normal prior of each sampling coordinate (see log_prior)."""
        out = {}
        for k, (amp, exponent, offset) in enumerate(self.blocks):
            a_lo, a_hi = self._b(amp)
            e_lo, e_hi = self._b(exponent)
            o_lo, o_hi = self._b(offset)
            names = self.w_names[3 * k: 3 * k + 3]
            out[names[0]] = (0.0, PRIOR_SD)
            out[names[1]] = (0.0, max(-e_lo, e_hi) * a_hi)
            out[names[2]] = (0.5 * (a_lo + a_hi + o_lo + o_hi), 0.5 * (a_hi - a_lo + o_hi - o_lo))
        return out

    def log_prior(self, w):
        """log prior density of w (untempered); JAX.

        Independent Normals on the sampling coordinates: u ~ N(0, 1) (the position of
        log A in its allowed interval, on the logit scale), s ~ N(0, (|e|max·A_hi)²)
        (the largest slope the bounds allow), y ~ N(centre, half-range²) of A + o;
        times a logit-normal factor (logit sd 1) for each exponent e = s/A on its
        bounds, which keeps the exponents away from their bounds where the data say
        nothing about them (the early-time tail of J(t)); phi0 logit-normal (logit sd
        1) on its bounds; zero outside the bounds (A, and the offset for any u, stay
        inside theirs by construction).
        """
        import jax.numpy as jnp

        lp = 0.0
        scales = self.prior_scales()
        for name, (c, sd) in scales.items():
            i = self.w_names.index(name)
            lp = lp + _normal_logpdf(w[..., i] - c, sd)
        for k, names in enumerate(self.blocks):
            A, e, o, _, _ = self._block((w[..., 3 * k], w[..., 3 * k + 1], w[..., 3 * k + 2]), names)
            o_lo, o_hi = self._b(names[2])
            a_lo, a_hi = self._b(names[0])
            lp = lp + jnp.where((o > o_lo) & (o < o_hi) & (A <= a_hi), 0.0, -jnp.inf)
            lp = lp + _logit_normal(e, *self._b(names[1]))
        if self.mode == "laminar_flow":
            lp = lp + _logit_normal(w[..., 6], *self._b("phi0"))
        return lp


def _logit_normal(value, lo, hi):
    """log density of a logit-normal variable on (lo, hi) (logit sd PRIOR_SD); -inf outside."""
    import jax.numpy as jnp

    x = (value - lo) / (hi - lo)
    ok = (x > 0) & (x < 1)
    xs = jnp.where(ok, x, 0.5)  # safe value: no NaN reaches the gradient
    v = jnp.log(xs) - jnp.log1p(-xs)
    lp = _normal_logpdf(v, PRIOR_SD) - jnp.log(xs) - jnp.log1p(-xs) - np.log(hi - lo)
    return jnp.where(ok, lp, -jnp.inf)


def _logit(x):
    return float(np.log(x) - np.log1p(-x))


def _normal_logpdf(v, sd):
    return -0.5 * (v / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))
