"""`xpcsfit batch` against one `xpcsfit fit` command per file, in the same run.

16 simulated laminar_flow files like ../shared/data (q = 0.001621, 0.003001, 0.00556 1/Å
× 8 phi × 500 frames, noise 0.02): 48 per-q fits.

- batch: ``xpcsfit.batch`` in a fresh Python process, on a LocalCluster of 2 workers ×
  1 thread that it starts; wall time from the process's start (imports, cluster start,
  JAX compilation on each worker, every fit and its outputs, catalogue and report) to its
  end. Median seconds per fit from the catalogue's attempts; peak memory per worker is
  each worker process's ru_maxrss at the end.
- peer: ``xpcsfit fit FILE --out DIR`` once per file, one after the other (each fits the
  file's three q together, in process: the CLI's choice for 3 M points); wall time of all
  16; median seconds per command; peak memory is the largest command's ru_maxrss.

    python benchmarks/bench_batch.py [--files 16] [--frames 500] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

Q = (0.001621, 0.003001, 0.00556)

BATCH = """
import json, resource, sys, warnings
import xpcsfit
from distributed import Client
from xpcsfit.engine.cluster import local_cluster
warnings.simplefilter("ignore", xpcsfit.GapWarning)
with local_cluster(int(sys.argv[3])) as cluster, Client(cluster) as client:
    s = xpcsfit.batch(sys.argv[1], out_root=sys.argv[2], client=client, progress=False)
    peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print(json.dumps({"counts": s.counts, "exit": s.exit_code, "worker_peak_kib": list(peaks.values())}))
"""


def uptime() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from xpcsfit.simulate import simulate

    base = Path(tempfile.mkdtemp(prefix="bench_batch-"))
    data = base / "data"
    for i in range(args.files):
        (data / f"sample{i // 4}").mkdir(parents=True, exist_ok=True)
    files = [simulate(data / f"sample{i // 4}" / f"run{i:02d}.hdf", q=Q, n_phi=8, n_frames=args.frames,
                      noise=0.02, seed=i) for i in range(args.files)]
    (data / "xpcsfit.yaml").write_text("gap: 2.0e6\n")
    print(f"{len(files)} files ({len(Q)} q × 8 phi × {args.frames} frames) in {data}; before: {uptime()}", flush=True)

    started = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", BATCH, str(data), str(base / "batch"), str(args.workers)],
                       capture_output=True, text=True)
    batch_wall = time.perf_counter() - started
    if p.returncode != 0:
        sys.exit(f"bench_batch: batch failed: {p.stderr.strip()[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    db = sqlite3.connect(base / "batch" / "xpcsfit.sqlite")
    per_fit = [r[0] for r in db.execute("SELECT wall_time_s FROM attempts WHERE status = 'done'")]
    n_fits = len(per_fit)
    print(f"batch: {out['counts']} in {batch_wall:.1f} s; {uptime()}", flush=True)

    peer_times, peer_peak = [], 0
    started = time.perf_counter()
    for i, f in enumerate(files):
        t0 = time.perf_counter()
        q = subprocess.Popen([sys.executable, "-m", "xpcsfit.cli", "fit", str(f), "--gap", "2.0e6",
                              "--out", str(base / "peer" / f"run{i:02d}_fit")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = q.stderr.read()
        _, status, usage = os.wait4(q.pid, 0)  # this command's own rusage (peak RSS in KiB)
        peer_times.append(time.perf_counter() - t0)
        peer_peak = max(peer_peak, usage.ru_maxrss)
        if os.waitstatus_to_exitcode(status) not in (0, 4):
            sys.exit(f"bench_batch: xpcsfit fit {f} failed: {err.decode().strip()[-1000:]}")
    peer_wall = time.perf_counter() - started
    print(f"peer: {len(files)} commands in {peer_wall:.1f} s; {uptime()}", flush=True)

    rows = [
        ("fits", f"{n_fits} (per q)", f"{len(files) * len(Q)} q in {len(files)} joint fits"),
        ("wall time incl. cluster start, s", f"{batch_wall:.1f}", f"{peer_wall:.1f}"),
        ("q fitted per hour", f"{n_fits / batch_wall * 3600:.0f}", f"{len(files) * len(Q) / peer_wall * 3600:.0f}"),
        ("median s per fit (per command)", f"{statistics.median(per_fit):.2f}", f"{statistics.median(peer_times):.2f}"),
        ("peak memory per worker (process), MiB", f"{max(out['worker_peak_kib']) / 1024:.0f}", f"{peer_peak / 1024:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'':<{width}} | xpcsfit batch ({args.workers} workers × 1 thread) | xpcsfit fit per file |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for name, a, b in rows:
        print(f"| {name:<{width}} | {a} | {b} |")
    print(f"\nafter: {uptime()}; os.cpu_count() = {os.cpu_count()}; files in {base}")


if __name__ == "__main__":
    main()
