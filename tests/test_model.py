"""The physics of DESIGN.md §2: closed-form integrals, smoothness, the Jacobian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad

from xpcsfit.model import (
    c2_model,
    exprel,
    g1_squared,
    g1_squared_with_jacobian,
    power_integral,
    shear_rate,
    transport_coefficient,
)
from xpcsfit.parameters import MODES


@pytest.mark.parametrize("a", [-1.7, -1.0, -1.0 + 1e-7, -0.3, 0.0, 0.8, 1.9])
@pytest.mark.parametrize("limits", [(0.1, 0.2), (0.5, 40.0), (3.0, 3.0 + 1e-6)])
def test_power_integral_matches_quadrature(a, limits):
    t1, t2 = limits
    expected, _ = quad(lambda t: t**a, t1, t2, epsabs=0, epsrel=1e-13)
    got = float(power_integral(a, np.log(t1), np.log(t2)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_power_integral_smooth_through_minus_one():
    # Value and derivative in a are continuous at a = -1 (the log/expm1 form), and
    # finite: no 0/0 and no NaN gradient from an unused branch.
    f = lambda a: power_integral(a, jnp.log(0.5), jnp.log(20.0))  # noqa: E731
    df = jax.grad(f)
    for a0 in (-1.0,):
        left, mid, right = f(a0 - 1e-6), f(a0), f(a0 + 1e-6)
        assert np.isfinite(mid) and abs(float(right - left)) < 1e-4
        g_left, g_mid, g_right = df(a0 - 1e-6), df(a0), df(a0 + 1e-6)
        assert np.isfinite(g_mid)
        assert float(g_mid) == pytest.approx(0.5 * float(g_left + g_right), rel=1e-6)
    # d/da ∫ t^a dt = ∫ t^a ln t dt
    expected, _ = quad(lambda t: np.log(t) / t, 0.5, 20.0)
    assert float(df(-1.0)) == pytest.approx(expected, rel=1e-9)


def test_exprel_series_and_direct_agree_at_switch():
    u = np.array([-1.0001e-4, -0.9999e-4, 0.9999e-4, 1.0001e-4])
    np.testing.assert_allclose(np.asarray(exprel(u)), np.expm1(u) / u, rtol=1e-14)


def test_negative_J_is_not_folded():
    # J < 0 must make g1 > 1, not fit like |J| (no abs(∫J)).
    t = jnp.array([1.0, 2.0])
    pos = g1_squared(jnp.array([1e4, 0.0, 0.0]), "static", 0.005, 2e6, jnp.zeros(1), t, t)
    neg = g1_squared(jnp.array([1e4, 0.0, -2e4]), "static", 0.005, 2e6, jnp.zeros(1), t, t)
    assert float(pos[0, 0, 1]) < 1.0 < float(neg[0, 0, 1])


def test_shear_term_physical_form():
    # g1_shear = sinc(q L cos(phi0 - phi) Γ / 2) with sinc(x) = sin(x)/x.
    q, L, gdot, phi0, phi = 0.005, 2e6, 1e-4, 6.0, 40.0
    t1, t2 = jnp.array([1.0]), jnp.array([3.0])
    theta = jnp.array([0.0, 0.0, 0.0, gdot, 0.0, 0.0, phi0])
    got = float(g1_squared(theta, "laminar_flow", q, L, jnp.array([phi]), t1, t2)[0, 0, 0])
    x = q * L * np.cos(np.deg2rad(phi0 - phi)) * gdot * 2.0 / 2
    assert got == pytest.approx((np.sin(x) / x) ** 2, rel=1e-12)


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_chain_rule_jacobian_equals_forward_mode(mode):
    theta = jnp.array([2e4, 0.3, 500.0, 2e-4, -0.2, 1e-5, 6.0])[: len(MODES[mode])]
    phi = jnp.array([0.0, 37.0, 96.0, 170.0])
    t1 = jnp.linspace(0.1, 5.0, 7)
    t2 = jnp.linspace(0.2, 9.0, 6)
    G, dG = g1_squared_with_jacobian(theta, mode, 0.0055, 2e6, phi, t1, t2)
    G_ref = g1_squared(theta, mode, 0.0055, 2e6, phi, t1, t2)
    dG_ref = jax.jacfwd(lambda th: g1_squared(th, mode, 0.0055, 2e6, phi, t1, t2))(theta)
    np.testing.assert_allclose(G, G_ref, rtol=1e-13, atol=1e-15)
    dG = np.moveaxis(np.asarray(dG), 1, -1)  # (n_phi, p, n1, n2) -> jacfwd's (n_phi, n1, n2, p)
    scale = np.max(np.abs(dG_ref), axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(dG) / scale, np.asarray(dG_ref) / scale, atol=1e-12)


def test_gradients_do_not_vanish_at_small_shear():
    # A small shear rate (gamma_dot_t0 = 1e-4 1/s, alpha = beta = 0, no offsets): every
    # parameter still moves G, shear and phi0 included; no clip or floor flattens the
    # model there. (At gamma_dot = 0 exactly the shear derivatives vanish by symmetry:
    # sinc is even.)
    theta = jnp.array([2e4, 0.0, 0.0, 1e-4, 0.0, 0.0, 6.0])
    phi = jnp.array([10.0])
    t = jnp.array([1.0, 5.0])
    _, dG = g1_squared_with_jacobian(theta, "laminar_flow", 0.0055, 2e6, phi, t, t)
    assert np.all(np.abs(np.asarray(dG)[0, :, 0, 1]) > 0)


def test_c2_model_contrast_offset():
    theta = jnp.array([2e4, 0.0, 0.0])
    t = jnp.array([1.0, 2.0])
    c2 = c2_model(theta, jnp.array([0.3]), jnp.array([1.1]), "static", 0.005, 2e6,
                  jnp.zeros(1), t, t)
    assert float(c2[0, 0, 0]) == pytest.approx(1.4)
    assert float(c2[0, 0, 1]) == pytest.approx(1.1 + 0.3 * np.exp(-(0.005**2) * 2e4 * 1.0))


def test_transport_coefficient_and_shear_rate_are_the_power_laws():
    theta = np.array([2e4, 0.3, 500.0, 2e-4, -0.2, 1e-5, 6.0])
    t = np.array([0.5, 5.0, 25.0])
    np.testing.assert_array_equal(transport_coefficient(theta, t), 2e4 * t**0.3 + 500.0)
    np.testing.assert_array_equal(shear_rate(theta, t), 2e-4 * t**-0.2 + 1e-5)
    # the same function under JAX (plain arithmetic)
    np.testing.assert_allclose(transport_coefficient(jnp.asarray(theta), jnp.asarray(t)),
                               transport_coefficient(theta, t), rtol=1e-15)


def test_import_sets_no_jax_option_and_enable_float64_does():
    import subprocess
    import sys

    code = ("import jax, xpcsfit; a = jax.config.jax_enable_x64; xpcsfit.enable_float64(); "
            "import jax.numpy as jnp; print(a, jax.config.jax_enable_x64, jnp.ones(1).dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "float64"]
