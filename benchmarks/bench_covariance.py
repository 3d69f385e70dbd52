"""Cost of the correlated-noise covariance on B2 (benchmarks/README.md): its one extra
pass (residual lag autocorrelation + per-q normal equations, at the optimum) against a
normal-equations pass of the solver, in this process (in-process evaluator, one core).

    python benchmarks/bench_covariance.py [--data-dir DIR] [--repeat 3]

B2's input is the bench suite's (generated once, cached in DIR). The fit itself makes
about 9 passes (5 normal-equation + 4 cost-only, see README); the covariance adds one,
and the start-value pass gives the noise weights at no extra cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from bench_suite import WORKLOADS, prepare_input

from xpcsfit.config import load_config
from xpcsfit.engine.evaluator import InProcessEvaluator
from xpcsfit.leastsq.driver import _plan, _starting_point
from xpcsfit.leastsq.uncertainty import MAX_LAG, inflation, tile_inflation_sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "xpcsfit-bench")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    w = WORKLOADS["B2"]
    path, _ = prepare_input(w, args.data_dir)
    cfg = load_config(None, mode=w.mode, gap=2.0e6)
    plan = _plan(path, cfg, dict(q=None, q_index=None, phi=None, frames=None, dt=None))
    ev = InProcessEvaluator([s.load() for s in plan.specs], plan.layout, cfg.mode, plan.L)
    x, _, _ = _starting_point(ev, plan.ds, cfg, plan.layout, plan.L)  # also sets the noise weights
    ev.block_sums(x)
    tile_inflation_sums(ev.tiles[0], x, plan.layout, cfg.mode, plan.L, ev.bin_weight, MAX_LAG)  # compile

    def timed(f):
        out = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            f()
            out.append(time.perf_counter() - started)
        return statistics.median(out)

    normal = timed(lambda: ev.block_sums(x))
    cost = timed(lambda: ev.costs(np.stack([x] * 4)))
    extra = timed(lambda: inflation(ev.map_tiles("covariance", tile_inflation_sums, x, plan.layout, cfg.mode, plan.L,
                                                 ev.bin_weight, MAX_LAG), plan.layout.n_q, plan.layout.n_bins,
                                    MAX_LAG))
    print(f"B2 ({w.label}, {plan.n_points:,} points, {len(plan.specs)} tiles), in process, "
          f"load average {os.getloadavg()[0]:.1f}:")
    print(f"  normal-equations pass {normal:.3f} s   cost pass (4 trial x) {cost:.3f} s   "
          f"covariance pass {extra:.3f} s = {extra / normal:.2f} normal-equation passes")
    print(f"  a B2 fit (5 normal + 4 cost passes) ≈ {5 * normal + 4 * cost:.2f} s of passes; "
          f"the covariance adds {extra / (5 * normal + 4 * cost):.0%}")


if __name__ == "__main__":
    main()
