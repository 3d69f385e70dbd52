"""Fits from several starts: the Latin hypercube, the physical-start screen, Δχ² in
noise units, and ``fit(starts=N)`` on flow_small (q index 8)."""

import json
import warnings

import numpy as np
import pytest

import xpcsfit
from xpcsfit.leastsq.results import FitResult
from xpcsfit.leastsq.starts import (
    delta_chi2,
    draw_starts,
    inner_bounds,
    latin_hypercube,
    positive_transport,
    scale_amplitudes,
    transport_distance,
)
from xpcsfit.model import shear_rate, transport_coefficient
from xpcsfit.parameters import DEFAULT_BOUNDS, MODES


def test_latin_hypercube_strata_and_scales():
    names = MODES["laminar_flow"]
    lo = np.array([DEFAULT_BOUNDS[n][0] for n in names])
    hi = np.array([DEFAULT_BOUNDS[n][1] for n in names])
    n = 40
    x = latin_hypercube(lo, hi, n, np.random.default_rng(1))
    assert x.shape == (n, lo.size) and np.all(x > lo) and np.all(x < hi)
    # D0 (1e2…1e5) and gamma_dot_t0 (1e-6…0.5) on a log scale, the others linearly: in
    # the scale's unit coordinate every one of the n strata holds exactly one start
    # (the Latin hypercube property; the 1e-3 margin moves points by < 1/n).
    log = [names.index("D0"), names.index("gamma_dot_t0")]
    u = (x - lo) / (hi - lo)
    u[:, log] = (np.log(x[:, log]) - np.log(lo[log])) / (np.log(hi[log]) - np.log(lo[log]))
    for j in range(lo.size):
        strata = np.floor(np.clip(u[:, j], 0, 1 - 1e-12) * n).astype(int)
        assert len(set(strata)) >= n - 1, names[j]  # a margin-clipped edge point may share


def test_draw_starts_keeps_only_physical_starts():
    # J(t) = D0·t**alpha + D_offset must be positive over the window, and the start must
    # be closer to the data than no correlation at all (contrast 0).
    lo = np.array([1e2, -2.0, -1e5, 0.0, 0.5])
    hi = np.array([1e5, 2.0, 1e5, 1.0, 1.5])
    x0 = np.array([2e4, 0.0, 0.0, 0.2, 1.0])
    times = np.linspace(0.1, 50, 16)
    seen = []

    def costs(xs):  # a stand-in: plateau (cost 10) where D0 > 5e4; contrast 0 costs 5
        xs = np.asarray(xs)
        seen.append(len(xs))
        return np.where(xs[:, 3] == 0, 5.0, np.where(xs[:, 0] > 5e4, 10.0, 1.0))

    names = ("D0", "alpha", "D_offset")
    starts = draw_starts(x0, lo, hi, names, 12, 0, times, costs, n_bins=1)
    assert starts.shape == (12, 5) and np.array_equal(starts[0], x0)
    assert positive_transport(starts[:, :3], times).all()
    assert np.all(starts[1:, 0] <= 5e4)
    assert np.all(starts[1:, 3:] == x0[3:])  # contrast, offset from the usual start
    again = draw_starts(x0, lo, hi, names, 12, 0, times, costs, n_bins=1)
    assert np.array_equal(starts, again)  # the seed makes them reproducible
    assert not np.array_equal(starts, draw_starts(x0, lo, hi, names, 12, 1, times, costs, n_bins=1))


def test_scale_amplitudes_takes_the_amplitude_and_exponent_the_cost_prefers():
    # A stand-in cost that, like a two-time map, fixes J(t) and gamma_dot(t) over the
    # window (squared log-ratios to the truth's curves at 16 times) and is flat away
    # from them (the plateau: tanh saturates). Latin hypercube draws over the default
    # bounds start mostly on the plateau; after the search every start is in the well:
    # each curve within 30 % of the truth's at the window's geometric middle (the
    # amplitude grid steps by ≈ 1.3 over J's 3 decades, 1.7 over gamma_dot's 5.7; the
    # exponent grid by 0.5), the cost never higher than before, inside the bounds,
    # J(t) positive, contrast and offset untouched.
    names = MODES["laminar_flow"]
    lo = np.array([DEFAULT_BOUNDS[n][0] for n in names] + [0.0, 0.5])
    hi = np.array([DEFAULT_BOUNDS[n][1] for n in names] + [1.0, 1.5])
    truth = np.array([2e4, 0.0, 0.0, 2e-4, 0.0, 0.0, 6.0, 0.2, 1.0])
    times = np.linspace(0.1, 50, 16)

    def costs(xs):
        xs = np.asarray(xs, float)
        out = []
        for x in xs:
            J, g = transport_coefficient(x, times), np.abs(shear_rate(x, times))
            with np.errstate(all="ignore"):
                d = np.stack([np.log(J / transport_coefficient(truth, times)) ** 2,
                              np.log(g / shear_rate(truth, times)) ** 2])
            out.append(np.sum(np.tanh(np.where(np.isfinite(d), d, np.inf))))  # 32 on the plateau
        return np.array(out)

    draws = latin_hypercube(lo[:7], hi[:7], 24, np.random.default_rng(3))
    xs = np.tile(truth, (len(draws), 1))
    xs[:, :7] = draws
    xs = xs[positive_transport(draws, times)]
    before = costs(xs)
    assert np.mean(before > 0.9 * 32) > 0.5  # most draws on the plateau
    after_xs = scale_amplitudes(xs, lo, hi, names, times, costs)
    after = costs(after_xs)
    assert np.all(after <= before)
    inner_lo, inner_hi = inner_bounds(lo, hi)
    assert np.all(after_xs >= np.minimum(inner_lo, xs)) and np.all(after_xs <= np.maximum(inner_hi, xs))
    assert positive_transport(after_xs[:, :7], times).all()
    np.testing.assert_array_equal(after_xs[:, 6:], xs[:, 6:])  # phi0, contrast, offset
    t_mid = np.sqrt(times[0] * times[-1])
    for curve in (transport_coefficient, shear_rate):
        ratio = np.abs(np.array([curve(x, t_mid) for x in after_xs]) / curve(truth, t_mid))
        np.testing.assert_array_less(np.abs(np.log(ratio)), np.log(1.3))


def test_transport_distance_in_standard_errors_and_up_to_the_shear_sign():
    t = np.linspace(0.1, 50, 16)
    ref = np.array([2e4, 0.0, 0.0, 2e-4, 0.0, 1e-5, 6.0])
    tr = {"t": t, "J_stderr": np.full(16, 100.0), "gamma_dot_stderr": np.full(16, 1e-5)}
    other = ref.copy()
    other[2] = 250.0  # J(t) 2.5 standard errors higher everywhere
    assert transport_distance(other, ref, tr, True) == pytest.approx((2.5, 0.0))
    mirrored = ref.copy()
    mirrored[[3, 5]] *= -1  # -gamma_dot(t): the same c2 (sinc² is even)
    assert transport_distance(mirrored, ref, tr, True) == pytest.approx((0.0, 0.0))
    assert transport_distance(mirrored, ref, tr, False) == pytest.approx((0.0, 0.0))
    faster = ref.copy()
    faster[3] *= 1.1  # 2e-5 higher: 2 standard errors
    assert transport_distance(faster, ref, tr, True)[1] == pytest.approx(2.0)


def test_delta_chi2_is_in_noise_units():
    # 1e6 points, cost ½Σr² = 500 at the best: σ² = 1e-3; a cost 0.0005 higher is Δχ² 1.
    assert delta_chi2(500.0005, 500.0, 1_000_000) == pytest.approx(1.0)
    np.testing.assert_allclose(delta_chi2(np.array([500.0, 501.0]), 500.0, 1_000_000), [0.0, 2000.0])


@pytest.mark.slow
def test_fit_from_several_starts_on_flow_small(shared_data, client):
    # 4 starts: the usual one and 3 Latin hypercube starts. Targets of issue 13: none
    # crashes; every start either reached the best (J(t) and gamma_dot(t) within the
    # best's 1-sigma bands over the window) or is named in a warning (a distinct
    # minimum with its Δχ², or not converged).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xpcsfit.GapWarning)
        r = xpcsfit.fit(shared_data / "flow_small.hdf", q_index=8, mode="laminar_flow", client=client,
                        starts=4, seed=0, progress=False)
    st = r.starts
    assert st["n"] == 4 and len(st["runs"]) == 4 and st["seed"] == 0
    assert all(run["error"] is None for run in st["runs"])
    costs = [run["cost"] for run in st["runs"]]
    assert st["best"] == int(np.argmin(costs)) and r.chi2 / 2 == pytest.approx(min(costs), rel=1e-12)
    assert r.converged, r.termination
    # 63 of 64 random starts reached the best in benchmarks/bench_starts.py (seeds 0, 1): all
    # 4 here (fixed seed) unless the start preparation regressed.
    assert st["reached_best"] == sum(run["reached"] for run in st["runs"]) == 4, st["runs"]
    text = " ".join(r.warnings)
    for i, run in enumerate(st["runs"]):
        if not run["reached"]:
            assert f"start {i} " in text or f"starts {i}," in text or f", {i}" in text, (i, run, r.warnings)
        assert run["delta_chi2"] >= 0
    truth = json.loads((shared_data / "flow_small.truth.json").read_text())["truth"]
    times = np.array([5.0, 10.0, 25.0])
    np.testing.assert_array_less(np.abs(r.J(times) / truth["D0"] - 1), 0.10)
    np.testing.assert_array_less(np.abs(r.gamma_dot(times) / truth["gamma_dot_t0"] - 1), 0.10)
    # fit.json keeps the record
    assert FitResult.from_json(r.to_json()).starts == json.loads(json.dumps(st))
