"""The homodyne two-time correlation model in JAX (DESIGN.md §2).

For one q and azimuthal angles phi_i (He et al., PNAS 2024, Eqs. 9-13):

    c2(phi_i, t1, t2) = offset_i + contrast_i * g1**2
    g1       = g1_diff * g1_shear
    g1_diff  = exp(-(q**2 / 2) * ∫_{t1}^{t2} J(t) dt)
    g1_shear = sinc(q * L * cos(phi0 - phi_i) * Γ(t1, t2) / 2),   sinc(x) = sin(x)/x
    J(t)     = D0 * t**alpha + D_offset                          [Å²/s]
    Γ(t1,t2) = ∫_{t1}^{t2} gamma_dot_t0 * t**beta + gamma_dot_t_offset dt

Everything here is pure and meant for float64: call :func:`enable_float64` before
using it (the tile kernels, the evaluators, the worker preload and the public entry
points ``xpcsfit.fit`` / ``xpcsfit.cmc`` do). Importing this module changes no JAX
setting. The per-tile sums live in ``engine/kernel.py``.

J(t) and gamma_dot(t) are written here once (:func:`transport_coefficient`,
:func:`shear_rate`); everything else that needs them calls these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def enable_float64() -> None:
    """Switch JAX to float64 (``jax_enable_x64``) in this process, for good.

    The fits need float64: the solver decides on cost differences of 1e-10 relative,
    which float32 sums cannot resolve. JAX's default is float32, and the flag is
    process-wide, so xpcsfit sets it explicitly where its JAX code runs (the tile
    kernel entry points, the in-process evaluator, the Dask worker preload, and
    ``xpcsfit.fit`` / ``xpcsfit.cmc``), not as a side effect of an import. Arrays made
    before the call keep their dtype; jitted functions compile anew for float64
    inputs. Cheap when already set, so callers need not track whether it was.
    """
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


_SERIES_BELOW = 1e-4


def exprel(u):
    """expm1(u) / u, smooth and accurate through u = 0 (value and gradient).

    Uses the Taylor series 1 + u/2 + u²/6 + u³/24 for |u| < 1e-4 (truncation error
    below 1e-17) and expm1(u)/u elsewhere; the unused branch is fed a safe value so
    that no NaN reaches the gradient.
    """
    small = jnp.abs(u) < _SERIES_BELOW
    u_safe = jnp.where(small, 1.0, u)
    series = 1.0 + u * (0.5 + u * (1.0 / 6.0 + u / 24.0))
    return jnp.where(small, series, jnp.expm1(u_safe) / u_safe)


def power_integral(a, log_t1, log_t2):
    """∫_{t1}^{t2} t**a dt for t1, t2 > 0, given log t1 and log t2.

    Written as ``t1**(a+1) * log(t2/t1) * exprel((a+1) * log(t2/t1))``, which equals
    (t2**(a+1) - t1**(a+1)) / (a+1) and goes smoothly to t1 * log(t2/t1) ... at
    a = -1 (the log form) without a 0/0; derivatives in ``a`` stay finite there.

    Parameters
    ----------
    a : scalar
        Exponent (alpha or beta).
    log_t1, log_t2 : arrays, broadcastable
        Natural logarithms of the integration limits (t in s).

    Returns
    -------
    Array of the broadcast shape, in s**(a+1).
    """
    delta = log_t2 - log_t1
    return jnp.exp((a + 1.0) * log_t1) * delta * exprel((a + 1.0) * delta)


def diffusion_integral(D0, alpha, D_offset, t1, t2, log_t1, log_t2):
    """∫_{t1}^{t2} J(t) dt with J(t) = D0 t**alpha + D_offset, in Å².

    No absolute value is taken: J < 0 is unphysical and must show in the cost.
    """
    return D0 * power_integral(alpha, log_t1, log_t2) + D_offset * (t2 - t1)


def shear_integral(gamma_dot_t0, beta, gamma_dot_t_offset, t1, t2, log_t1, log_t2):
    """Γ(t1, t2) = ∫_{t1}^{t2} gamma_dot(t) dt (dimensionless strain)."""
    return gamma_dot_t0 * power_integral(beta, log_t1, log_t2) + gamma_dot_t_offset * (
        t2 - t1
    )


def g1_squared(theta, mode, q, L, phi, t1, t2):
    """g1(phi, t1, t2)**2 for every angle and every (t1, t2) pair of a grid.

    Parameters
    ----------
    theta : array (p,)
        Physics parameters in the order of ``xpcsfit.parameters.MODES[mode]``.
    mode : {"static", "laminar_flow"}
        Static (Python) argument.
    q : scalar
        Scattering vector magnitude, 1/Å.
    L : scalar
        Gap (sample thickness along the beam), Å. Unused in static mode.
    phi : array (n_phi,)
        Azimuthal angles, degrees from the flow direction convention of DESIGN.md §2.
    t1 : array (n1,)
        Times of the rows, s, all > 0.
    t2 : array (n2,)
        Times of the columns, s, all > 0.

    Returns
    -------
    array (n_phi, n1, n2) for laminar_flow, (1, n1, n2) for static (broadcasts
    over phi).
    """
    return g1_squared_pairs(theta, mode, q, L, phi, t1[:, None], t2[None, :])


def g1_squared_pairs(theta, mode, q, L, phi, t1, t2):
    """g1(phi, t1, t2)**2 for every angle at time pairs (t1[i], t2[i]), not a grid.

    ``t1`` and ``t2`` (s, > 0) broadcast against each other (pairs: both (n,); a grid:
    (n1, 1) and (1, n2), which is :func:`g1_squared`); other arguments as there.

    Returns
    -------
    array (n_phi, *shape) for laminar_flow, (1, *shape) for static, ``shape`` the
    broadcast shape of t1 and t2.
    """
    lt1 = jnp.log(t1)
    lt2 = jnp.log(t2)
    D0, alpha, D_offset = theta[0], theta[1], theta[2]
    diff = jnp.exp(-(q * q) * diffusion_integral(D0, alpha, D_offset, t1, t2, lt1, lt2))
    if mode == "static":
        return diff[None]
    gamma_dot_t0, beta, gamma_dot_t_offset, phi0 = theta[3], theta[4], theta[5], theta[6]
    strain = shear_integral(gamma_dot_t0, beta, gamma_dot_t_offset, t1, t2, lt1, lt2)
    cosine = jnp.expand_dims(jnp.cos(jnp.deg2rad(phi0 - phi)), tuple(range(1, 1 + strain.ndim)))
    x = 0.5 * q * L * cosine * strain[None]
    # jnp.sinc is the normalised sinc sin(pi y)/(pi y), smooth (with derivatives) at 0.
    shear = jnp.sinc(x / jnp.pi)
    return diff[None] * shear * shear


def c2_model(theta, contrast, offset, mode, q, L, phi, t1, t2):
    """Model c2(phi, t1, t2) = offset + contrast * g1**2, DESIGN.md §2.

    Parameters
    ----------
    theta : array (p,)
        Physics parameters (see :func:`g1_squared`).
    contrast, offset : arrays (n_phi,)
        Per-angle contrast and offset of this q.
    mode, q, L, phi, t1, t2
        As in :func:`g1_squared`.

    Returns
    -------
    array (n_phi, n1, n2), float64.
    """
    g2 = g1_squared(theta, mode, q, L, phi, t1, t2)
    return offset[:, None, None] + contrast[:, None, None] * g2


def transport_coefficient(theta, t):
    """J(t) = D0 t**alpha + D_offset in Å²/s, for t (s) > 0.

    theta: the physics vector in MODES order (either mode); t: an array (NumPy or JAX).
    Plain arithmetic, so it works on NumPy arrays without JAX and under ``jax.grad``.
    """
    return theta[0] * t ** theta[1] + theta[2]


def power_law_gradient(a0, a, t):
    """∂/∂(a0, a, b) of a0·t**a + b at times t (n,) s > 0: (n, 3), columns t**a,
    a0·t**a·ln t and 1 — the Jacobian of :func:`transport_coefficient` in (D0, alpha,
    D_offset) and of :func:`shear_rate` in (gamma_dot_t0, beta, gamma_dot_t_offset)."""
    t = np.asarray(t, float)
    ta = t**a
    return np.stack([ta, a0 * ta * np.log(t), np.ones_like(t)], axis=1)


def shear_rate(theta, t):
    """gamma_dot(t) = gamma_dot_t0 t**beta + gamma_dot_t_offset in 1/s (laminar_flow).

    theta: the laminar_flow physics vector (MODES order); t: an array, as for
    :func:`transport_coefficient`.
    """
    return theta[3] * t ** theta[4] + theta[5]


def g1_squared_factored(theta, mode, q, L, phi, t1, t2):
    """G = g1**2 and its Jacobian ∂G/∂θ in factored form, by the chain rule.

    G = E(t1, t2) · S(phi, t1, t2) with E = exp(-q² ∫J dt) and S = sinc²(x),
    x = q L cos(phi0 - phi) Γ / 2. Every column of ∂G/∂θ is a per-angle factor times
    a phi-independent time map:

        ∂G/∂(D0, alpha, D_offset)                  = S            · ∂E/∂θ_d
        ∂G/∂(gamma_dot_t0, beta, gamma_dot_t_offset) = E S'(x) qL cos/2 · ∂Γ/∂θ_s
        ∂G/∂phi0                                   = E S'(x) (−qL sin/2 · π/180) · Γ

    so the time integrals and their forward-mode derivatives are formed once on the
    (n1, n2) grid, and the tile kernel can reduce over the angles before it multiplies
    by the time maps (it never forms the (n_phi, p, n1, n2) Jacobian).

    Parameters
    ----------
    As for :func:`g1_squared`.

    Returns
    -------
    G : array (n_phi, n1, n2) (static: (1, n1, n2))
    groups : list of (factor, maps)
        One entry per parameter group, in parameter order: ``factor`` (n_phi, n1, n2)
        (static: (1, n1, n2)) and ``maps`` (m, n1, n2), so that
        ∂G/∂θ for the group's m parameters is ``factor[:, None] * maps[None]``.
        laminar_flow: groups of 3 (diffusion), 3 (shear rate) and 1 (phi0) parameters;
        static: one group of 3.
    """
    t1c = t1[:, None]
    t2r = t2[None, :]
    lt1 = jnp.log(t1c)
    lt2 = jnp.log(t2r)

    def diffusion(params):
        return diffusion_integral(params[0], params[1], params[2], t1c, t2r, lt1, lt2)

    q2 = q * q
    integral, d_integral = _value_and_jacfwd(diffusion, theta[:3])
    E = jnp.exp(-q2 * integral)
    dE = -q2 * E[None] * d_integral  # (3, n1, n2)
    if mode == "static":
        return E[None], [(jnp.ones_like(E)[None], dE)]

    def strain(params):
        return shear_integral(params[0], params[1], params[2], t1c, t2r, lt1, lt2)

    gamma, d_gamma = _value_and_jacfwd(strain, theta[3:6])
    phi0 = theta[6]
    angle = jnp.deg2rad(phi0 - phi)
    half_qL = 0.5 * q * L
    cos_a = jnp.cos(angle)[:, None, None]
    sin_a = jnp.sin(angle)[:, None, None]
    x = half_qL * cos_a * gamma[None]
    sinc, d_sinc = jax.jvp(lambda v: jnp.sinc(v / jnp.pi), (x,), (jnp.ones_like(x),))
    S = sinc * sinc
    common = E[None] * 2.0 * sinc * d_sinc  # E · dS/dx, (n_phi, n1, n2)
    G = E[None] * S
    return G, [
        (S, dE),
        (common * (half_qL * cos_a), d_gamma),
        (common * (-half_qL * (jnp.pi / 180.0)) * sin_a, gamma[None]),
    ]


def g1_squared_with_jacobian(theta, mode, q, L, phi, t1, t2):
    """G = g1**2 and the full Jacobian ∂G/∂θ, from :func:`g1_squared_factored`.

    For tests and small grids; the tile kernel uses the factored form.

    Returns
    -------
    G : array (n_phi, n1, n2) (static: (1, n1, n2))
    dG : array (n_phi, p, n1, n2) (static: (1, 3, n1, n2))
    """
    G, groups = g1_squared_factored(theta, mode, q, L, phi, t1, t2)
    return G, jnp.concatenate([f[:, None] * maps[None] for f, maps in groups], axis=1)


def _value_and_jacfwd(f, params):
    """f(params) and its forward-mode Jacobian, shape params.shape + f(params).shape."""
    basis = jnp.eye(params.shape[0], dtype=params.dtype)
    value, tangents = jax.vmap(lambda v: jax.jvp(f, (params,), (v,)), out_axes=(None, 0))(basis)
    return value, tangents
