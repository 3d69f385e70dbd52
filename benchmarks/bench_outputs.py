"""What writing a fit's outputs costs: fit.json, fitted.zarr, the c2 heatmaps and
transport.png, before and after issue 11's changes, in one run.

For flow_small q index 8 (8 heatmaps) it times ``leastsq.driver.write_result_directory`` (``_write`` in earlier revisions) — everything
between the solver's end and the result directory's rename — in a warm fit (the
kernels compiled, matplotlib imported), for this tree and for an earlier revision
(``--before``, default the commit before issue 11's output changes), each in its own
process on a 2-worker LocalCluster (the path both trees have), and for this tree in
process too. The trees are run in interleaved rounds so that both see the same load.

    python benchmarks/bench_outputs.py [--before REV] [--rounds 2] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _shared import SHARED_DATA

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

RUN = r"""
import json, sys, tempfile, time, warnings
from pathlib import Path
import xpcsfit
from xpcsfit.leastsq import driver
warnings.simplefilter("ignore")
path, where = sys.argv[1], sys.argv[2]
spent = []
name = "write_result_directory" if hasattr(driver, "write_result_directory") else "_write"  # older trees
write = getattr(driver, name)
def timed(*a, **k):
    t = time.perf_counter(); write(*a, **k); spent.append(time.perf_counter() - t)
setattr(driver, name, timed)
tmp = Path(tempfile.mkdtemp())
def fits(**kw):
    totals = []
    for k in range(3):  # the first compiles and imports; the best of the other two
        t = time.perf_counter()
        xpcsfit.fit(path, q_index=8, mode="laminar_flow", progress=False, out=tmp / f"r{k}", **kw)
        totals.append(time.perf_counter() - t)
    return min(totals[1:]), min(spent[1:])
if where == "cluster":
    from distributed import Client
    from xpcsfit.engine.cluster import local_cluster
    with local_cluster(2) as c, Client(c) as client:
        total, w = fits(client=client)
else:
    total, w = fits(in_process=True)
print(json.dumps({"total": total, "write": w}))
"""


def measure(tree: Path, path: Path, where: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    p = subprocess.run([sys.executable, "-c", RUN, str(path), where], capture_output=True, text=True,
                       env=env, cwd=tempfile.gettempdir())
    if p.returncode != 0:
        sys.exit(f"bench_outputs: {tree} {where}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="34180a4", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    args = parser.parse_args()
    path = args.data / "flow_small.hdf"
    with tempfile.TemporaryDirectory(prefix="xpcsfit-before-") as before:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "xpcsfit"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        print(f"flow_small q8, warm fit with --out: seconds in _write (outputs) and for the whole fit() call; "
              f"{os.cpu_count()} cores")
        print(f"{'round':>5}{'load':>7}   {'before ' + args.before + ' (cluster)':>26}{'after (cluster)':>20}"
              f"{'after (in process)':>22}   write: before / after")
        for k in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            order = [(Path(before), "cluster"), (ROOT, "cluster"), (ROOT, "in process")]
            if k % 2 == 0:  # interleaved: the other order in every other round
                order = order[::-1]
            runs = {o: measure(o[0], path, o[1]) for o in order}
            runs = [runs[o] for o in [(Path(before), "cluster"), (ROOT, "cluster"), (ROOT, "in process")]]
            cells = "".join(f"{r['write']:>9.2f} of {r['total']:>5.2f} s" for r in runs)
            print(f"{k:>5}{load:>7.2f}   {cells}   {runs[0]['write'] / runs[1]['write']:.2f}× (cluster), "
                  f"{runs[0]['write'] / runs[2]['write']:.2f}× (in process)", flush=True)


if __name__ == "__main__":
    main()
