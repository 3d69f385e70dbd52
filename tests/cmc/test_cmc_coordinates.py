"""NUTS's sampling coordinates: the map to the physics parameters and the prior on them."""

from __future__ import annotations

import numpy as np
import pytest

from xpcsfit.cmc.coordinates import Coordinates
from xpcsfit.config import load_config


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_coordinates_round_trip_and_prior(mode):
    import jax.numpy as jnp

    co = Coordinates.from_config(load_config(None, mode=mode))
    theta = np.array([2.0e4, -0.3, 1.0e3, 2.0e-4, 0.2, 1.0e-5, 4.0])[: len(co.names)]
    w = co.from_theta(theta)
    back = np.asarray(co.to_theta(jnp.asarray(w)))
    np.testing.assert_allclose(back, theta, rtol=1e-9, atol=1e-12)
    assert np.isfinite(float(co.log_prior(jnp.asarray(w))))
    # Any u keeps every parameter inside its bounds (the interval construction).
    for u in (-30.0, -3.0, 0.0, 3.0, 30.0):
        w2 = w.copy()
        w2[0] = u
        th = np.asarray(co.to_theta(jnp.asarray(w2)))
        assert np.all(th >= np.array(co.lower) - 1e-9) and np.all(th <= np.array(co.upper) + 1e-9)
    # An amplitude on its bound (a common least-squares answer) starts inside.
    theta[0] = 1.0e5
    assert np.isfinite(float(co.log_prior(jnp.asarray(co.from_theta(theta)))))
