"""Benchmark of the end-to-end fit (issue 2): flow_small q index 8 and a simulated
3 phi × 1000 frame laminar_flow dataset, on a 2-worker LocalCluster; and B1 warm, in
process and on the cluster, beside nlsq warm (issue 11).

Prints, per workload: points, iterations, data passes, wall time of the first fit
(JAX compilation included), of a second fit on the warm cluster (compilation
excluded), the cluster start time, and the peak resident memory of each worker.

Then B1 (benchmarks/bench_suite.py's static 3 phi × 600 frames): the whole warm
``xpcsfit.fit()`` call in this process (``in_process=True``) and on the warm
2-worker cluster, and nlsq's warm solve of the same points (in its own process, from
xpcsfit's start, compilation subtracted as bench_suite does), in ``--rounds``
interleaved rounds so that both sides see the same machine load; the load average is
printed with each round.

    python benchmarks/bench_fit.py [--workers 2] [--data ../shared/data] [--rounds 2] [--only-b1]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _shared import SHARED_DATA  # benchmarks/ is sys.path[0] when run as a script

import xpcsfit
from xpcsfit.engine.cluster import local_cluster
from xpcsfit.simulate import simulate


def peak_rss_mib() -> float:
    """Peak resident memory of the calling process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved B1 rounds")
    parser.add_argument("--only-b1", action="store_true", help="skip the issue-2 workloads")
    args = parser.parse_args()
    warnings.simplefilter("ignore", xpcsfit.GapWarning)
    if not args.only_b1:
        issue2(args)
    b1(args)


def issue2(args) -> None:
    from distributed import Client

    tmp = Path(tempfile.mkdtemp(prefix="xpcsfit-bench-"))
    sim = simulate(tmp / "flow_3phi_1000.hdf", q=(0.0055,), n_phi=3, n_frames=1000, seed=1)
    workloads = [
        ("flow_small q8", args.data / "flow_small.hdf", {"q_index": 8}),
        ("sim 3 phi × 1000 frames", sim, {}),
    ]
    rows = []
    for name, path, selection in workloads:
        started = time.perf_counter()
        with local_cluster(args.workers) as cluster, Client(cluster) as client:
            cluster_start = time.perf_counter() - started
            t0 = time.perf_counter()
            first = xpcsfit.fit(path, mode="laminar_flow", client=client, progress=False, **selection)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm_result = xpcsfit.fit(path, mode="laminar_flow", client=client, progress=False, **selection)
            warm = time.perf_counter() - t0
            peaks = client.run(peak_rss_mib)
        rows.append((name, first.n_points, first.iterations, first.data_passes, cluster_start, cold,
                     cluster_start + cold, warm, max(peaks.values()), warm_result.converged))
    header = (f"{'workload':<26}{'points':>11}{'iter':>6}{'passes':>8}{'cluster s':>11}"
              f"{'fit+jit s':>11}{'total s':>9}{'warm s':>8}{'peak MiB/worker':>17}{'conv':>6}")
    print(f"xpcsfit {xpcsfit.__version__}, {args.workers} workers (1 thread each)")
    print(header)
    for r in rows:
        print(f"{r[0]:<26}{r[1]:>11,}{r[2]:>6}{r[3]:>8}{r[4]:>11.1f}{r[5]:>11.1f}{r[6]:>9.1f}"
              f"{r[7]:>8.1f}{r[8]:>17.0f}{str(r[9]):>6}")


def b1(args) -> None:
    """B1 warm: xpcsfit in process, xpcsfit on the cluster, nlsq; interleaved rounds."""
    import bench_suite as suite
    from distributed import Client

    w = suite.WORKLOADS["B1"]
    path, _ = suite.prepare_input(w, suite.DEFAULT_DATA_DIR)

    def warm(**where) -> tuple[float, object]:
        best, result = float("inf"), None
        for _ in range(3):  # the fastest of 3 warm fits: the least disturbed by other load
            t0 = time.perf_counter()
            result = xpcsfit.fit(path, mode=w.mode, progress=False, **where)
            best = min(best, time.perf_counter() - t0)
        return best, result

    print(f"\n{w.label}: warm fit() wall s (fastest of 3) vs nlsq's warm solve; "
          f"{os.cpu_count()} cores, xpcsfit cluster {args.workers} workers × 1 thread")
    print(f"{'round':>5}{'load':>7}{'in process s':>14}{'cluster s':>11}{'nlsq s':>9}"
          f"{'nlsq/in process':>17}{'nlsq/cluster':>14}   final cost in process / cluster / nlsq")
    xpcsfit.fit(path, mode=w.mode, progress=False, in_process=True)  # compile in this process
    with local_cluster(args.workers) as cluster, Client(cluster) as client:
        xpcsfit.fit(path, mode=w.mode, progress=False, client=client)  # compile on the workers
        for k in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            here, r_here = warm(in_process=True)
            there, r_there = warm(client=client)
            with tempfile.TemporaryDirectory(prefix="xpcsfit-peers-") as tmp:
                problem = Path(tmp) / "problem.npz"
                suite.peer_problem(w, path, {"n_points": r_here.n_points, "start": r_here.start,
                                             "lower": r_here.lower, "upper": r_here.upper,
                                             "sigma": r_here.noise["sigma"]}, problem)
                rec = suite.run_peer("nlsq", problem, Path(tmp))
            if "error" in rec:
                print(f"{k:>5}{load:>7.2f}{here:>14.3f}{there:>11.3f}   nlsq failed: {rec['error']}")
                continue
            peer = suite.peer_excl(rec)
            costs = [r_here.chi2 / 2, r_there.chi2 / 2, rec["runs"][-1]["cost"]]
            print(f"{k:>5}{load:>7.2f}{here:>14.3f}{there:>11.3f}{peer:>9.3f}{peer / here:>16.2f}×"
                  f"{peer / there:>13.2f}×   " + " / ".join(f"{c:.10e}" for c in costs), flush=True)
            assert np.array_equal(r_here.x, r_there.x), "in process and on the cluster differ"


if __name__ == "__main__":
    main()
