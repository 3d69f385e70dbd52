"""Where `fit` runs by default: one process against a fresh LocalCluster, end to end.

For simulated laminar_flow files of growing size (``--phi`` angles × T frames), runs the
whole command — imports, opening, tiles, JAX compilation, the fit, the result directory —
once in process and once on a fresh 2-worker LocalCluster (``--cluster local``), each in
its own Python process, the two interleaved so that both see the same machine load.
Prints the wall times side by side and the crossover: the number of points below which
``xpcsfit.fit(in_process=None)`` runs in process (``IN_PROCESS_MAX_POINTS``).

    python benchmarks/bench_in_process.py [--frames 500 1000 1500 2000] [--phi 8] [--repeats 1]
    python benchmarks/bench_in_process.py --input B1.hdf --mode static --repeats 2   # one given file
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import sys, warnings, xpcsfit
warnings.simplefilter("ignore", xpcsfit.GapWarning)
where = sys.argv[3]
r = xpcsfit.fit(sys.argv[1], out=sys.argv[2], progress=False, mode=sys.argv[4],
                **({"in_process": True} if where == "in process" else {"cluster": "local"}))
print(r.n_points, r.iterations, r.data_passes, r.converged)
"""


def run(path: Path, out: Path, where: str, mode: str) -> tuple[float, str]:
    started = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RUN, str(path), str(out), where, mode], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if p.returncode not in (0, 4):
        sys.exit(f"bench_in_process: {where} fit of {path} failed: {p.stderr.strip().splitlines()[-1:]}")
    return wall, p.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 1000, 1500, 2000])
    parser.add_argument("--phi", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--input", type=Path, help="fit this file instead of simulated ones")
    parser.add_argument("--mode", default="laminar_flow")
    args = parser.parse_args()
    from xpcsfit.leastsq.placement import IN_PROCESS_MAX_POINTS
    from xpcsfit.simulate import simulate

    tmp = Path(tempfile.mkdtemp(prefix="xpcsfit-inproc-"))
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores; "
          f"`xpcsfit fit` end to end, {args.mode}{f', {args.phi} phi' if args.input is None else ''}; IN_PROCESS_MAX_POINTS = {IN_PROCESS_MAX_POINTS:,}")
    print(f"{'frames':>7}{'points':>13}{'in process s':>14}{'LocalCluster s':>16}{'ratio':>8}  iter/passes  load")
    for t in ([None] if args.input else args.frames):
        path = args.input or simulate(tmp / f"sim_{t}.hdf", q=(0.0055,), n_phi=args.phi, n_frames=t, seed=t,
                                      mode=args.mode)
        here, there = [], []
        for k in range(args.repeats):
            order = ("in process", "cluster") if k % 2 == 0 else ("cluster", "in process")
            for where in order:
                wall, info = run(path, tmp / f"out_{t}_{where.replace(' ', '_')}", where, args.mode)
                (here if where == "in process" else there).append(wall)
        h, c = min(here), min(there)
        print(f"{t or '-':>7}{int(info[0]):>13,}{h:>14.1f}{c:>16.1f}{c / h:>8.2f}  {info[1]}/{info[2]}"
              f"{os.getloadavg()[0]:>10.2f}   (each: the fastest of {args.repeats})", flush=True)
        if args.input is None:
            path.unlink()


if __name__ == "__main__":
    main()
