"""NUTS's sampling coordinates: the map to the physics parameters and the prior on them."""

from __future__ import annotations

import numpy as np
import pytest

from xpcsfit.cmc.coordinates import Coordinates
from xpcsfit.config import load_config
from xpcsfit.errors import ConfigError
from xpcsfit.model import enable_float64, shear_rate, transport_coefficient

T = np.arange(500) * 0.1  # flow_small's frame times, s


def coordinates(mode, **bounds):
    config = {"bounds": bounds} if bounds else None
    return Coordinates.from_config(load_config(config, mode=mode), T)


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
@pytest.mark.parametrize("theta", [
    [2.0e4, -0.3, 1.0e3, 2.0e-3, 0.2, 1.0e-4, 4.0],   # every parameter determined
    [2.0e4, 0.01, 3.0e2, 2.0e-4, -0.01, 1.0e-5, 6.0],  # alpha, beta ≈ 0 (flow_small)
    [5.0e3, 0.6, -1.0e3, 1.0e-3, -0.7, 2.0e-4, -3.0],  # strong curvature, both signs
])
def test_round_trip(mode, theta):
    import jax.numpy as jnp

    enable_float64()
    co = coordinates(mode)
    theta = np.array(theta[: len(co.names)])
    w = co.from_theta(theta)
    back = np.asarray(co.to_theta(jnp.asarray(w)))
    np.testing.assert_allclose(back, theta, rtol=1e-8)
    assert np.isfinite(float(co.log_prior(jnp.asarray(w), jnp.asarray(back))))


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_window_mean_and_variation_are_what_the_coordinates_say(mode):
    """y is the mean of J (gamma_dot) over the window and |Δ| its rms variation about it,
    both of its moving average over the window (of ``averaged`` window times)."""
    import jax.numpy as jnp

    enable_float64()
    co = coordinates(mode)
    theta = np.array([2.0e4, -0.3, 1.0e3, 2.0e-3, 0.2, 1.0e-4, 4.0])[: len(co.names)]
    w = co.from_theta(theta)
    t = np.exp(co._log_t())
    curves = [np.asarray(transport_coefficient(jnp.asarray(theta), t))]
    if mode == "laminar_flow":
        curves.append(np.asarray(shear_rate(jnp.asarray(theta), t)))
    assert co.averaged == 8  # flow_small's window and the default bounds allow the widest average
    for k, f in enumerate(curves):
        f = co.averaged_over_window(f)
        assert w[3 * k + 2] == pytest.approx(f.mean(), rel=1e-10)
        assert abs(w[3 * k + 1]) == pytest.approx(f.std(), rel=1e-10)
        assert np.sign(w[3 * k + 1]) == np.sign(theta[3 * k + 1])


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_every_w_maps_inside_the_bounds(mode):
    """Any u (and any variation and level) gives parameters inside the bounds; the
    gradient of the prior is finite wherever the prior is."""
    import jax
    import jax.numpy as jnp

    enable_float64()
    co = coordinates(mode)
    w0 = co.from_theta(np.array([2.0e4, 0.0, 0.0, 2.0e-4, 0.0, 0.0, 6.0])[: len(co.names)])
    rng = np.random.default_rng(0)
    spread = np.abs(w0) + np.array([1.0, 1e3, 1e3, 1.0, 1e-4, 1e-4, 1.0])[: w0.size]
    W = w0 + rng.normal(size=(5000, w0.size)) * 3 * spread
    W[:10, 0] = [-30, -10, -3, -1, 0, 1, 3, 10, 30, 60]
    theta = np.asarray(jax.jit(jax.vmap(co.to_theta))(jnp.asarray(W)))
    def log_prior(w):
        return co.log_prior(w, co.to_theta(w))

    lp = np.asarray(jax.jit(jax.vmap(log_prior))(jnp.asarray(W)))
    grad = np.asarray(jax.jit(jax.vmap(jax.grad(log_prior)))(jnp.asarray(W)))
    inside = np.all((theta >= np.array(co.lower)) & (theta <= np.array(co.upper)), axis=1)
    assert not np.isnan(theta).any()
    # The prior is zero exactly where a parameter left its bounds, which happens only
    # where the bounds leave no amplitude at all for that variation and level.
    np.testing.assert_array_equal(np.isfinite(lp), inside)
    # Draws 3 spreads wide reach (variation, level) pairs that no bounded parameters can
    # make (a few %); near the start every one is allowed.
    assert inside.mean() > 0.9 and inside[:10].all()
    assert np.isfinite(grad[np.isfinite(lp)]).all()


def test_an_amplitude_on_its_bound_starts_inside():
    import jax.numpy as jnp

    enable_float64()
    co = coordinates("static")
    w = co.from_theta(np.array([1.0e5, 1e-4, -8.0e4]))
    theta = np.asarray(co.to_theta(jnp.asarray(w)))
    assert theta[0] < 1.0e5 and np.isfinite(float(co.log_prior(jnp.asarray(w), jnp.asarray(theta))))
    # J over the window is kept: only the split between D0 and D_offset moved.
    J = 1.0e5 * np.exp(1e-4 * co._log_t()) - 8.0e4
    assert w[2] == pytest.approx(co.averaged_over_window(J).mean(), rel=1e-9)


def test_bounds_cmc_cannot_use():
    with pytest.raises(ConfigError, match="bounds.D0"):
        coordinates("static", D0=[0.0, 1e5])
    with pytest.raises(ConfigError, match="bounds.alpha"):
        coordinates("static", alpha=[0.1, 2.0])


def test_the_average_is_narrowed_where_the_widest_would_not_be_invertible():
    """On a short window (1-2 s) with alpha down to -4 the 8-time moving average leaves
    the variation non-monotone in alpha: the next narrower one is taken, and the map
    still round-trips."""
    import jax.numpy as jnp

    enable_float64()
    config = load_config({"bounds": {"alpha": [-4.0, 2.0]}}, mode="static")
    co = Coordinates.from_config(config, np.linspace(1.0, 2.0, 200))
    assert co.averaged == 4
    theta = np.array([2.0e4, -3.0, 1.0e3])
    np.testing.assert_allclose(np.asarray(co.to_theta(jnp.asarray(co.from_theta(theta)))), theta, rtol=1e-8)
