"""xpcsfit.cmc end to end on a LocalCluster (2 workers): consensus against full-data NUTS,
flow_small's transport coefficients, the result directory, and a worker killed mid-shard.

Statistical assertions state their tolerance reasoning next to them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import xpcsfit
from xpcsfit.cmc.driver import cmc
from xpcsfit.engine.spans import task_kind
from xpcsfit.parameters import MODES

pytestmark = pytest.mark.slow

# Draws a chain of the consensus runs. The R-hat of 2 chains is itself uncertain by about
# 0.01 at a few hundred draws (its folded form reads the tails): 2 × 400 left alpha's at the
# 1.01 limit, 2 × 600 D0's at 1.018 in one run and below 1.01 in another.
SAMPLES = 1000


@pytest.fixture(scope="module")
def consensus_runs(client, sim_file, tmp_path_factory):
    """Full-data NUTS (K = 1) and a 4-shard consensus of sim_file from one least-squares fit;
    the consensus run's task keys and result directory."""
    from distributed import get_task_stream

    client.wait_for_workers(2)
    fit = xpcsfit.fit(sim_file, mode="laminar_flow", gap=2e6, client=client, progress=False)
    opts = dict(from_fit=fit, warmup=300, samples=SAMPLES, chains=2, thin=2, client=client, progress=False)
    full = cmc(sim_file, shards=1, **opts)
    out = tmp_path_factory.mktemp("cmc-e2e") / "cmc"
    with get_task_stream(client) as stream:
        cons = cmc(sim_file, shards=4, out=out, **opts)
    keys = {t["key"] for t in stream.data}
    return {"full": full, "cons": cons, "keys": keys, "out": out}


def test_consensus_matches_full_data_posterior(consensus_runs, sim_truth):
    full, cons = consensus_runs["full"], consensus_runs["cons"]
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
        assert abs(full.mean[i] - sim_truth[name]) < 4 * full.sd[i], name
    # What users read: J(5 s) and gamma_dot(5 s), whose sd the combination must keep
    # (issue 12: within 25 % of the single NUTS run on all the shards' points; same
    # Monte Carlo reasoning as for the parameters above).
    for draws in ("J_draws", "gamma_dot_draws"):
        sd_full, sd_cons = (getattr(r, draws)([5.0])[:, 0].std() for r in (full, cons))
        assert abs(sd_cons / sd_full - 1) < 0.25, (draws, sd_cons, sd_full)


def test_the_shard_count_rule_measures_the_posterior_width(consensus_runs):
    # The default K rests on the Laplace sd of the levels (J's and gamma_dot's window
    # mean) measured before sampling (xpcsfit.cmc.plan.choose_shards). Against the
    # full-data NUTS posterior of the same levels: an sd from ~300 effective draws is
    # uncertain by ~4 %, and this posterior is close to Gaussian, so the two agree
    # within 15 %.
    full = consensus_runs["full"]
    record = full.summary["shard_count"]
    assert record["K"] == 1 and record["how"] == "given"
    w = full.sampling_draws.reshape(-1, len(full.sampling_names))
    for name, rel in record["level_relative_sd_all_points"].items():
        column = w[:, full.sampling_names.index(name)]
        assert abs(rel / (column.std() / abs(column.mean())) - 1) < 0.15, name
    assert consensus_runs["cons"].summary["shard_count"]["level_relative_sd_per_shard"] == pytest.approx(
        {n: 2 * v for n, v in record["level_relative_sd_all_points"].items()}, rel=0.05)


def test_shards_run_as_separate_tasks_on_both_workers(consensus_runs):
    cons = consensus_runs["cons"]
    shard_keys = {k for k in consensus_runs["keys"] if task_kind(k) == "cmc-shard"}
    assert len(shard_keys) == 4
    assert len({s["worker"] for s in cons.shards}) == 2


def test_result_directory_holds_posterior_summary_and_figures(consensus_runs):
    import xarray as xr

    out = consensus_runs["out"]
    assert consensus_runs["cons"].out == out
    summary = json.loads((out / "summary.json").read_text())
    for name in MODES["laminar_flow"]:
        assert set(summary["parameters"][name]) >= {"mean", "sd", "q03", "q97", "r_hat", "ess_bulk"}
    assert len(summary["shards"]) == 4 and summary["combined"]["method"] == "consensus"
    assert len(summary["transport"]["J"]["mean"]) == len(summary["transport"]["t"])
    post = xr.open_zarr(out / "posterior.zarr", consolidated=False)
    assert post["shard_draws"].dims == ("shard", "chain", "draw", "parameter")
    assert post["shard_draws"].shape == (4, 2, SAMPLES, 7)
    assert post["draws"].dims == ("chain", "draw", "parameter")
    assert list(post["parameter"].values) == list(MODES["laminar_flow"])
    for png in ("corner.png", "trace.png", "transport.png"):
        assert (out / png).stat().st_size > 10_000
    assert not (out / "initial_fit.json").exists()  # the fit was given, not run here


def test_flow_small_transport_covers_truth(client, flow_small):
    # flow_small, q index 8, all seven laminar_flow parameters free. The posterior
    # conditions on every 4th frame in t1 and t2 (thin=4: ~62 000 points, the noise
    # inflation kappa recomputed for that lattice) to keep the test at a few minutes.
    r = cmc(flow_small, q_index=8, gap=2e6, shards=4, thin=4, warmup=300, samples=300, chains=2,
            client=client, progress=False)
    assert r.shard_names == [f"shard-{k:02d}" for k in range(4)]  # every shard ran and was combined
    t = np.array([5.0, 10.0, 25.0])
    truth = {"J": 2 * 1.0e4, "gamma_dot": 2.0e-4}  # J = 2 D_SE; steady shear (README)
    for key, draws in (("J", r.J_draws(t)), ("gamma_dot", r.gamma_dot_draws(t))):
        mean, sd = draws.mean(axis=0), draws.std(axis=0)
        assert np.all(np.abs(mean - truth[key]) < 3 * sd), (key, mean, sd)
        # Honest widths: never the 1e-6-relative collapse of process-pool CMC.
        assert np.all(sd > 1e-3 * np.abs(mean)), (key, mean, sd)


def test_killing_a_worker_still_gives_a_complete_result(static_file):
    # Its own cluster, not the session's: the test kills one of its workers.
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
                        if any(task_kind(k) == "cmc-shard" for k in keys)]
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


def test_the_result_does_not_depend_on_the_callers_jax_precision(static_file, client, tmp_path):
    """cmc switches JAX to float64 itself: called from a fresh interpreter (JAX at its
    float32 default) it gives bit for bit the draws it gives here, where the session
    enabled float64 (tests/conftest.py). The starting point and the combination run in
    the caller's process, so a float32 caller would shift every chain. From a fit.json,
    so that no least-squares fit (which sets float64 too) runs first."""
    xpcsfit.fit(static_file, mode="static", client=client, out=tmp_path / "fit", progress=False)
    opts = dict(mode="static", from_fit=str(tmp_path / "fit"), shards=2, warmup=60, samples=60, chains=1,
                seed=3, progress=False)
    here = cmc(static_file, client=client, **opts)
    address = client.scheduler_info()["address"]
    script = ("import json, jax, xpcsfit\n"
              "assert not jax.config.jax_enable_x64\n"
              f"r = xpcsfit.cmc({str(static_file)!r}, scheduler={address!r}, **{opts!r})\n"
              "print(json.dumps(r.draws.tolist()))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = np.array(json.loads(run.stdout.strip().splitlines()[-1]))
    np.testing.assert_array_equal(fresh, here.draws)

