"""Consensus Monte Carlo: sharding, model, combination, diagnostics, and end to end.

Statistical assertions state their tolerance reasoning next to them. The end-to-end
tests (marked slow) start their own LocalCluster of 2 workers on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import xpcsfit
from xpcsfit.cmc.driver import _n_shards, cmc
from xpcsfit.cmc.combine import combine, ess_bulk, r_hat
from xpcsfit.cmc.shard import Coordinates, log_likelihood, pair_g1_squared, shard_data, shard_of, tile_lattice
from xpcsfit.cmc.noise import noise_model, tile_noise_sums
from xpcsfit.config import load_config
from xpcsfit.errors import ConfigError, InputError
from xpcsfit.parameters import ParameterLayout
from xpcsfit.model import g1_squared
from xpcsfit.parameters import MODES
from xpcsfit.simulate import simulate
from xpcsfit.engine.tiles import plan_tiles

FLOW = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "flow_small.hdf")
FLOW = os.path.normpath(os.environ.get("XPCSFIT_FLOW_SMALL", FLOW))
if not os.path.exists(FLOW):
    FLOW = "/work/shared/data/flow_small.hdf"

# An identifiable laminar_flow problem: J(t) and gamma_dot(t) curve over the window
# (alpha, beta != 0, non-zero offsets), iid noise, so that every physics parameter is
# determined and full-data NUTS is cheap.
SIM_TRUTH = dict(D0=1.0e4, alpha=-0.6, D_offset=5.0e3, gamma_dot_t0=1.0e-3, beta=0.5,
                 gamma_dot_t_offset=5.0e-4, phi0=6.0)
SIM = dict(q=[0.015], n_phi=4, n_frames=160, dt=0.01, noise=0.005, seed=1)


def coords_for(mode):
    cfg = load_config(None, mode=mode)
    names = MODES[mode]
    return Coordinates(mode, names, tuple(cfg.bound(n)[0] for n in names), tuple(cfg.bound(n)[1] for n in names))


# ---------------------------------------------------------------- options and inputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(shards=0), "shards"),
    (dict(samples=0), "samples"),
    (dict(warmup=0), "warmup"),
    (dict(chains=0), "chains"),
    (dict(thin=0), "thin"),
    (dict(samples=2.5), "samples"),
    (dict(combine="average"), "combine: unknown method 'average'"),
    (dict(seed=-1), "seed"),
    (dict(target_accept=1.0), "target_accept"),
    (dict(target_accept=0), "target_accept"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        cmc(FLOW, q_index=8, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def test_from_fit_missing_or_malformed(tmp_path):
    with pytest.raises(InputError, match="no such fit file"):
        cmc(FLOW, q_index=8, from_fit=tmp_path / "nope.json", progress=False)
    bad = tmp_path / "fit.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a readable fit.json"):
        cmc(FLOW, from_fit=tmp_path, progress=False)  # a directory means its fit.json
    bad.write_text(json.dumps({"mode": "laminar_flow", "parameters": {"D0": {"value": 1.0}}}))
    with pytest.raises(InputError, match="malformed fit.json .missing key"):
        cmc(FLOW, from_fit=bad, progress=False)
    bad.write_text(json.dumps({"mode": "sheared"}))
    with pytest.raises(InputError, match="malformed fit.json"):
        cmc(FLOW, from_fit=bad, progress=False)


def test_too_many_shards():
    assert _n_shards(250_000, None) == 7  # ~40 000 points per shard
    assert _n_shards(500, None) == 1
    with pytest.raises(ConfigError, match="shards: 300 is too many"):
        _n_shards(250_000, 300)


def test_positive_amplitude_bounds_required():
    with pytest.raises(ConfigError, match="bounds.D0: cmc needs a positive lower bound"):
        cmc(FLOW, q_index=8, gap=2e6, config={"bounds": {"D0": [-1.0, 1e5]}}, progress=False)


# ---------------------------------------------------------------- model pieces


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
def test_coordinates_round_trip_and_prior(mode):
    import jax.numpy as jnp

    co = coords_for(mode)
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


def test_pair_model_matches_grid_model():
    import jax.numpy as jnp

    theta = jnp.array([2.0e4, -0.2, 500.0, 2.0e-4, 0.1, 1.0e-5, 6.0])
    phi = jnp.array([10.0, 60.0, 120.0])
    t = jnp.linspace(0.1, 5.0, 12)
    grid = np.asarray(g1_squared(theta, "laminar_flow", 0.0055, 2e6, phi, t, t))
    i, j = np.triu_indices(12, 1)
    pairs = np.asarray(pair_g1_squared(theta, "laminar_flow", 0.0055, 2e6, phi, t[i], t[j]))
    np.testing.assert_allclose(pairs, grid[:, i, j], rtol=1e-12)


def test_shard_of_balanced_and_interleaved():
    i, j = np.triu_indices(200, 1)
    k = shard_of(i, j, 4)
    counts = np.bincount(k, minlength=4)
    # A hash is a random-like partition: counts are binomial, sd sqrt(n/4·3/4) ≈ 61 of
    # ~4975; 5 % (≈ 4 sd) is a safe bound.
    np.testing.assert_allclose(counts, i.size / 4, rtol=0.05)
    for shard in range(4):
        lags = set((j - i)[k == shard])
        assert set(range(1, 20)) <= lags  # every short lag in every shard
        assert set(i[k == shard]) >= set(range(190))  # every row (time) in every shard
    np.testing.assert_array_equal(shard_of(i, j, 4), k)  # deterministic


# ---------------------------------------------------------------- combination, diagnostics


def gaussian_subposteriors(rng, K=4, n=4000, p=3):
    """K Gaussian sub-posteriors and their exact product (mean, covariance)."""
    subs, precisions, shifts = [], [], []
    for _ in range(K):
        a = rng.normal(size=(p, p))
        cov = a @ a.T + p * np.eye(p)
        mean = rng.normal(size=p)
        subs.append(rng.multivariate_normal(mean, cov, size=(1, n)))
        P = np.linalg.inv(cov)
        precisions.append(P)
        shifts.append(P @ mean)
    cov = np.linalg.inv(sum(precisions))
    return np.stack(subs), cov @ sum(shifts), cov


@pytest.mark.parametrize("method", ["consensus", "parametric"])
def test_combine_gaussian_product(method):
    rng = np.random.default_rng(0)
    subs, mean, cov = gaussian_subposteriors(rng)
    out = combine(subs, method, seed=1).reshape(-1, 3)
    assert out.shape == (4000, 3)
    sd = np.sqrt(np.diag(cov))
    # The combined mean of 4000 draws has sd ≈ sd/√4000 ≈ 0.016 sd plus the error of
    # the estimated weights (of the same order): 0.1 sd is > 4 of either.
    np.testing.assert_allclose(out.mean(axis=0), mean, atol=0.1 * sd.max())
    # A sample covariance of 4000 draws has relative error ≈ √(2/4000) ≈ 2 %; 10 %.
    np.testing.assert_allclose(np.cov(out.T), cov, rtol=0.1, atol=0.1 * sd.max() ** 2)


def test_combine_keeps_chain_structure_and_single_shard():
    rng = np.random.default_rng(1)
    subs = rng.normal(size=(3, 2, 500, 2))
    assert combine(subs).shape == (2, 500, 2)
    np.testing.assert_array_equal(combine(subs[:1]), subs[0])


def test_r_hat_and_ess():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 1000))
    # iid draws: R-hat is 1 within its sampling error (~1e-3 for 4 × 1000 draws) and
    # the bulk ESS is the number of draws within ~10 %.
    assert r_hat(x) < 1.01
    assert 0.8 * x.size < ess_bulk(x) < 1.2 * x.size
    x[0] += 2.0  # one chain elsewhere
    assert r_hat(x) > 1.1
    ar = np.zeros((2, 2000))
    for t in range(1, 2000):  # AR(1), phi = 0.9: ESS ≈ n (1 - 0.9)/(1 + 0.9) ≈ 5 %
        ar[:, t] = 0.9 * ar[:, t - 1] + rng.normal(size=2)
    assert ess_bulk(ar) < 0.15 * ar.size


# ---------------------------------------------------------------- data pieces


@pytest.fixture(scope="module")
def static_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmc") / "static.hdf"
    return simulate(path, mode="static", q=[0.015], n_phi=3, n_frames=120, dt=0.01,
                    params={"alpha": -0.6, "D_offset": 5.0e3, "D0": 1.0e4}, noise=0.01, seed=3)


def test_noise_pass_on_white_noise(static_file):
    ds = xpcsfit.open_dataset(static_file)
    layout = ParameterLayout(MODES["static"], 1, 3)
    x = layout.join([1.0e4, -0.6, 5.0e3], np.full(3, 0.25), np.full(3, 1.0))  # the truth
    plan = plan_tiles(ds, 64)
    parts = [tile_noise_sums(t, x, layout, "static", 2e6, 16) for t in plan]
    noise = noise_model(parts, 1, 3, thin=2, max_lag=16)
    # Residuals at the truth are the simulated iid noise, sd 0.01: an sd estimated from
    # n = 7021 points per bin has relative sd 1/√(2n) ≈ 0.85 %; 3 % is 3.5 of those.
    np.testing.assert_allclose(noise["sigma"], 0.01, rtol=0.03)
    # White noise: no inflation beyond the sampling noise of the summed correlations.
    assert 1.0 <= noise["kappa"][0] < 1.1
    # The FFT lag sums equal direct sums.
    tile = plan[0].load()
    from xpcsfit.engine.kernel import tile_model

    r = (tile.c2 - tile_model(tile, x, layout, "static", 2e6)) * tile.weight
    a, b = 2, -3
    n = r.shape[1]
    direct = (r[:, : n - a, -b:] * r[:, a:, : n + b]).sum(axis=(1, 2))
    np.testing.assert_allclose(parts[0]["acf"][:, 16 + a, 16 + b], direct, rtol=1e-8, atol=1e-12)


def test_lattice_and_likelihood_peak_at_truth(static_file):
    import jax.numpy as jnp

    ds = xpcsfit.open_dataset(static_file)
    pieces = [tile_lattice(t, 2) for t in plan_tiles(ds, 64)]
    assert all(np.all(p["j"] > p["i"]) for p in pieces)
    data = shard_data(pieces, 0, 1, 3)
    assert data.n_points == 3 * 60 * 59 // 2  # frames 1..119 → 60 lattice rows
    var = np.full(3, 1e-4)
    truth = jnp.array([1.0e4, -0.6, 5.0e3])
    ll0 = float(log_likelihood(truth, data, var, "static", 2e6))
    for scale in (0.9, 1.1):
        assert float(log_likelihood(truth * jnp.array([scale, 1.0, 1.0]), data, var, "static", 2e6)) < ll0 - 10


def test_cli_parser():
    from xpcsfit.cmc_cli import add_parser

    parser = argparse.ArgumentParser(prog="xpcsfit")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["cmc", "in.hdf", "--shards", "8", "--warmup", "100", "--samples", "200",
                              "--chains", "3", "--from-fit", "f.json", "--out", "o", "--scheduler",
                              "tcp://h:8786", "--q-index", "8", "--combine", "parametric",
                              "--target-accept", "0.95"])
    assert (args.shards, args.warmup, args.samples, args.chains) == (8, 100, 200, 3)
    assert (args.from_fit, args.out, args.scheduler, args.q_index, args.combine) == (
        "f.json", "o", "tcp://h:8786", [8], "parametric")
    assert args.target_accept == 0.95
    with pytest.raises(SystemExit):
        parser.parse_args(["cmc", "in.hdf", "--combine", "mean"])


# ---------------------------------------------------------------- end to end on a cluster


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from xpcsfit.engine.cluster import local_cluster

    with local_cluster(2) as cluster, Client(cluster) as c:
        c.wait_for_workers(2)
        yield c


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("cmc") / "sim.hdf", mode="laminar_flow", params=SIM_TRUTH, **SIM)


@pytest.mark.slow
def test_consensus_matches_full_data_posterior(client, sim_file, tmp_path):
    from distributed import get_task_stream

    fit = xpcsfit.fit(sim_file, mode="laminar_flow", gap=2e6, client=client, progress=False)
    opts = dict(from_fit=fit, warmup=300, samples=400, chains=2, thin=2, client=client, progress=False)
    full = cmc(sim_file, shards=1, **opts)
    with get_task_stream(client) as stream:
        cons = cmc(sim_file, shards=4, out=tmp_path / "cmc", **opts)

    # Every shard of both runs converged.
    for s in full.shards + cons.shards:
        assert s["passed"], s["problems"]
        assert s["r_hat_max"] < 1.01
    # Consensus vs the full-data posterior: on this Gaussian-like problem the consensus
    # is exact up to Monte Carlo error. Each mean has MC sd ≈ sd/√ESS ≈ sd/√300 ≈ 0.06 sd
    # (two runs: 0.08 sd), the shards' Gaussian approximation adds a bias of order
    # skewness/K; 0.5 sd (the acceptance bound) is > 5 MC sds. An sd from ~300 effective
    # draws has relative error ≈ 1/√(2·300) ≈ 4 %; 25 % leaves room for the small loss of
    # information from each shard having its own contrast/offset.
    for i, name in enumerate(cons.names):
        assert abs(cons.mean[i] - full.mean[i]) < 0.5 * full.sd[i], name
        assert abs(cons.sd[i] / full.sd[i] - 1) < 0.25, name
        # and both contain the truth (4 sd: a 1-in-15 000 event per parameter)
        assert abs(full.mean[i] - SIM_TRUTH[name]) < 4 * full.sd[i], name

    # The shards ran as separate tasks, on both workers.
    keys = [t["key"] for t in stream.data if "xpcsfit-cmc-shard" in str(t["key"])]
    assert len(set(map(str, keys))) == 4
    assert len({s["worker"] for s in cons.shards}) == 2

    # Output directory.
    out = tmp_path / "cmc"
    summary = json.loads((out / "summary.json").read_text())
    for name in MODES["laminar_flow"]:
        assert set(summary["parameters"][name]) >= {"mean", "sd", "q03", "q97", "r_hat", "ess_bulk"}
    assert len(summary["shards"]) == 4 and summary["combined"]["method"] == "consensus"
    assert len(summary["transport"]["J"]["mean"]) == len(summary["transport"]["t"])
    import xarray as xr

    post = xr.open_zarr(out / "posterior.zarr", consolidated=False)
    assert post["shard_draws"].dims == ("shard", "chain", "draw", "parameter")
    assert post["shard_draws"].shape == (4, 2, 400, 7)
    assert post["draws"].dims == ("chain", "draw", "parameter")
    assert list(post["parameter"].values) == list(MODES["laminar_flow"])
    for png in ("corner.png", "trace.png", "transport.png"):
        assert (out / png).stat().st_size > 10_000


@pytest.mark.slow
def test_flow_small_transport_covers_truth(client):
    # flow_small, q index 8, all seven laminar_flow parameters free. The posterior
    # conditions on every 4th frame in t1 and t2 (thin=4: ~62 000 points, the noise
    # inflation kappa recomputed for that lattice) to keep the test at a few minutes.
    r = cmc(FLOW, q_index=8, gap=2e6, shards=4, thin=4, warmup=300, samples=300, chains=2,
            client=client, progress=False)
    t = np.array([5.0, 10.0, 25.0])
    truth = {"J": 2 * 1.0e4, "gamma_dot": 2.0e-4}  # J = 2 D_SE; steady shear (README)
    for key, draws in (("J", r.J_draws(t)), ("gamma_dot", r.gamma_dot_draws(t))):
        mean, sd = draws.mean(axis=0), draws.std(axis=0)
        assert np.all(np.abs(mean - truth[key]) < 3 * sd), (key, mean, sd)
        # Honest widths: never the 1e-6-relative collapse of process-pool CMC.
        assert np.all(sd > 1e-3 * np.abs(mean)), (key, mean, sd)
    assert len(r.shards) == 4 and all("error" not in "".join(s["problems"]) for s in r.shards)


@pytest.mark.slow
def test_killing_a_worker_still_gives_a_complete_result(static_file):
    from distributed import Client

    from xpcsfit.engine.cluster import local_cluster

    with local_cluster(2) as cluster, Client(cluster) as c:
        c.wait_for_workers(2)
        pids = c.run(os.getpid)
        killed = {}

        def killer():
            deadline = time.time() + 240
            while time.time() < deadline and not killed:
                busy = [w for w, keys in c.processing().items()
                        if any("xpcsfit-cmc-shard" in str(k) for k in keys)]
                if busy:
                    time.sleep(2.0)  # let the shard get under way
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed["worker"] = busy[0]
                    return
                time.sleep(0.2)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        r = cmc(static_file, mode="static", shards=4, warmup=150, samples=150, chains=2, client=c,
                target_accept=0.95, progress=False)
        thread.join(timeout=5)
    assert killed, "no shard was seen running, so no worker was killed"
    assert [s["name"] for s in r.shards] == [f"shard-{k:02d}" for k in range(4)]
    assert all("worker" in s for s in r.shards)  # every shard ran to the end (none failed)
    assert r.shard_draws.shape == (4, 2, 150, 3)
    assert r.summary["settings"]["target_accept"] == 0.95
    assert np.all(np.isfinite(r.draws))
