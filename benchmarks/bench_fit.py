"""Benchmark of the end-to-end fit (issue 2): flow_small q index 8 and a simulated
3 phi × 1000 frame laminar_flow dataset, on a 2-worker LocalCluster.

Prints, per workload: points, iterations, data passes, wall time of the first fit
(JAX compilation included), of a second fit on the warm cluster (compilation
excluded), the cluster start time, and the peak resident memory of each worker.

    python benchmarks/bench_fit.py [--workers 2] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings
from pathlib import Path

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
    args = parser.parse_args()
    warnings.simplefilter("ignore", xpcsfit.GapWarning)
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


if __name__ == "__main__":
    main()
