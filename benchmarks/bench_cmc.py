"""Wall time of ``xpcsfit cmc`` on flow_small (q index 8, laminar_flow) with K = 2, 4 and 8.

Each run is the whole command as a user runs it: LocalCluster start (2 workers unless
--workers), least-squares fit, noise pass, K NUTS shards, combination, outputs. Printed
per K: wall time, points per shard, per-shard sampling time, R-hat / bulk ESS /
divergences, and J(t), gamma_dot(t) at 5, 10, 25 s against the truth of the file; and,
because the machine may be shared, the load average before and after each run and the
CPU time of this process and its cluster's worker processes (RUSAGE_CHILDREN counts
them once they have exited, i.e. after the LocalCluster closes).

    .venv/bin/python benchmarks/bench_cmc.py [--shards auto 2 4 8] [--thin T] [--warmup 500]
                                             [--samples 500] [--chains 2] [--workers 2]

Defaults are xpcsfit cmc's own (thin: the command's default when not given; K "auto":
no --shards, the command chooses, and the chosen K is printed).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from _shared import SHARED_DATA

TRUTH = {"J": 2.0e4, "gamma_dot": 2.0e-4}  # J = 2 D_SE, steady shear (shared/data/README.md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED_DATA / "flow_small.hdf"))
    ap.add_argument("--shards", nargs="+", default=["2", "4", "8"], help="K values, or auto (the command's choice)")
    ap.add_argument("--thin", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()

    from xpcsfit.cli import main as xpcsfit_main
    from xpcsfit.engine.cluster import local_cluster
    from xpcsfit.model import shear_rate, transport_coefficient

    print(f"flow_small q index 8, laminar_flow (7 parameters free); thin {a.thin or 'default'}, {a.chains} chains × "
          f"({a.warmup} warm-up + {a.samples}) per shard; {a.workers} workers × 1 thread; {os.cpu_count()} cores")
    t_eval = np.array([5.0, 10.0, 25.0])
    for K in a.shards:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cmc"
            load_before = os.getloadavg()
            cpu_before = _cpu_seconds()
            started = time.perf_counter()
            with local_cluster(a.workers) as cluster:
                address = cluster.scheduler_address
                code = xpcsfit_main([
                    "cmc", a.data, "--q-index", "8", "--gap", "2e6", *([] if K == "auto" else ["--shards", K]),
                    *(["--thin", str(a.thin)] if a.thin else []),
                    "--warmup", str(a.warmup), "--samples", str(a.samples), "--chains", str(a.chains),
                    "--out", str(out), "--scheduler", address, "--quiet"])
            wall = time.perf_counter() - started
            cpu = _cpu_seconds() - cpu_before
            load_after = os.getloadavg()
            import json

            s = json.loads((out / "summary.json").read_text())
            import xarray as xr

            post = xr.open_zarr(out / "posterior.zarr", consolidated=False)
            draws = post["draws"].values.reshape(-1, post.sizes["parameter"])
        theta = draws.T[:, :, None]  # (p, S, 1): parameter i of every draw is theta[i]
        J, g = transport_coefficient(theta, t_eval), shear_rate(theta, t_eval)
        chosen = s["shard_count"]
        print(f"\n=== K = {K} ({chosen['K']} shards, {chosen['how']}): wall time {wall:.1f} s "
              f"(cluster start + LSQ fit + shards + combination + "
              f"outputs; exit code {code}) ===")
        print(f"  CPU time {cpu:.0f} s (this process + workers); load average (1 min) {load_before[0]:.1f} "
              f"before, {load_after[0]:.1f} after, on {os.cpu_count()} cores")
        for sh in s["shards"]:
            print(f"  {sh['name']}: {sh.get('n_points', 0):,} points, {sh.get('wall_time_s', float('nan')):.0f} s, "
                  f"R-hat max {sh.get('r_hat_max', float('nan')):.3f}, bulk ESS min "
                  f"{sh.get('ess_bulk_min', float('nan')):.0f}, {sh.get('divergences', '?')} divergences, "
                  f"{'passed' if sh['passed'] else 'FAILED'}")
        c = s["combined"]
        print(f"  combined: R-hat max {c['r_hat_max']:.3f}, bulk ESS min {c['ess_bulk_min']:.0f}, "
              f"noise inflation kappa {s['likelihood']['noise']['kappa'][0]:.2f}")
        for key, v in (("J", J), ("gamma_dot", g)):
            for i, t in enumerate(t_eval):
                m, sd = v[:, i].mean(), v[:, i].std()
                print(f"  {key}({t:g} s) = {m:.5g} ± {sd:.3g}  (truth {TRUTH[key]:.3g}: "
                      f"{(m - TRUTH[key]) / sd:+.2f} sd; sd/mean {sd / abs(m):.3f})")


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
