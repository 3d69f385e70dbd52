"""Random starts on flow_small (q index 8, laminar_flow): how many reach the best fit.

Issue 13 item 6's experiment. The starts are those of ``xpcsfit fit --starts N``
(:func:`xpcsfit.leastsq.starts.draw_starts`: Latin hypercube draws of the physics
parameters inside the default bounds, contrast and offset from the data, physical starts
only), prepared two ways side by side, each fitted in this process (the in-process
evaluator, one start after another) with the fit's solver and termination:

- ``raw``: the draws as they are (``--starts`` before the amplitude search);
- ``scaled``: each draw's J(t) and gamma_dot(t) amplitudes chosen by the cost
  (:func:`xpcsfit.leastsq.starts.scale_amplitudes`), what ``--starts`` does now.

Per preparation it prints, per start, the termination, iterations, Δχ² from the best end
(noise units, :func:`xpcsfit.leastsq.starts.delta_chi2`) and the largest distance of
J(t) and gamma_dot(t) (up to its sign: :func:`xpcsfit.leastsq.starts.transport_distance`)
from the best's over the window in the best's standard errors; then how many ended
within one standard error of the best (both curves), how many claimed convergence
elsewhere, and how many raised. The best is the lowest end over both preparations, so
both are judged against the same fit. Failures are caught and counted, never end the run.

Usage: python benchmarks/bench_starts.py [--starts 16] [--seed 0] [--prepare raw scaled]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from xpcsfit.config import load_config
from xpcsfit.engine.evaluator import InProcessEvaluator
from xpcsfit.leastsq import driver
from xpcsfit.leastsq.determined import window_times
from xpcsfit.leastsq.starts import delta_chi2, draw_starts, transport_distance
from xpcsfit.model import enable_float64

FLOW = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "flow_small.hdf")
SWEEPS = {"raw": 0, "scaled": None}  # None: draw_starts' default


def fit_starts(name, ev, plan, cfg, starts, lo, hi):
    solver = driver._solver(lo, hi, plan.ds, cfg, plan.layout)
    out = []
    for x0 in starts:
        t0 = time.perf_counter()
        try:
            state = solver.solve(ev, x0)
            out.append({"state": state, "message": solver.message(state), "s": time.perf_counter() - t0})
            print(f"  {name} start {len(out) - 1}: {state.termination.value}, {state.iteration} iterations, "
                  f"cost {state.ne.cost:.10g}, {out[-1]['s']:.0f} s", flush=True)
        except Exception as exc:  # counted: the experiment asks how many crash
            out.append({"error": f"{type(exc).__name__}: {exc}", "s": time.perf_counter() - t0})
            print(f"  {name} start {len(out) - 1}: raised {out[-1]['error']}", flush=True)
    return out


def best_result(all_runs, ev, plan, cfg):
    ok = [r for runs in all_runs for r in runs if "error" not in r and np.isfinite(r["state"].ne.cost)]
    best = min(ok, key=lambda r: r["state"].ne.cost)
    ev.normal_equations(best["state"].x)  # the best's bands: the covariance at its normal equations
    return best, driver._result(best["state"], best["message"], ev, plan.ds, cfg, plan.layout)


def report(name, runs, best, res, plan, prep_s):
    tr, p = res.transport, plan.layout.p
    within = claimed_elsewhere = 0
    print(f"\n== {name} starts ({prep_s:.1f} s to prepare): best cost {best['state'].ne.cost:.10g}, "
          f"J sd/J {np.median(tr['J_stderr'] / tr['J']):.2%}, gamma_dot sd/gamma_dot "
          f"{np.median(tr['gamma_dot_stderr'] / np.abs(tr['gamma_dot'])):.2%} (median over the window)")
    print(f"{'start':>5} {'termination':<16} {'conv':>5} {'iter':>5} {'passes':>6} {'s':>6} {'dchi2':>12} "
          f"{'J sd':>9} {'gdot sd':>9}")
    for i, r in enumerate(runs):
        if "error" in r:
            print(f"{i:5d} CRASH {r['error']}")
            continue
        st = r["state"]
        dJ, dg = transport_distance(st.x[:p], best["state"].x[:p], tr, True)
        near = dJ <= 1 and dg <= 1
        within += near
        claimed_elsewhere += st.converged and not near
        print(f"{i:5d} {st.termination.value:<16} {st.converged!s:>5} {st.iteration:5d} {st.passes:6d} "
              f"{r['s']:6.1f} {float(delta_chi2(st.ne.cost, best['state'].ne.cost, res.dof)):12.4g} "
              f"{dJ:9.3g} {dg:9.3g}")
    crashes = sum("error" in r for r in runs)
    print(f"{name}: {within}/{len(runs)} within one sd of the best J(t) and gamma_dot(t); "
          f"{claimed_elsewhere} converged elsewhere; {crashes} crashed; {sum(r['s'] for r in runs):.0f} s of fits")
    return within, claimed_elsewhere, crashes, sum(r["s"] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=16, help="random starts (the usual start is not fitted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prepare", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    enable_float64()
    cfg = load_config(None, mode="laminar_flow")
    plan = driver._plan(FLOW, cfg, dict(q=None, q_index=8, phi=None, frames=None, dt=None))
    ev = InProcessEvaluator([s.load() for s in plan.specs], plan.layout, cfg.mode, plan.L)
    x0, lo, hi = driver._starting_point(ev, plan.ds, cfg, plan.layout, plan.L)
    t = plan.ds["t1"].values
    print(f"flow_small q8: {plan.n_points:,} points, {args.starts} Latin hypercube starts (seed {args.seed}); "
          f"load average {os.getloadavg()[0]:.1f}")
    runs, prep = {}, {}
    for name in args.prepare:
        t0 = time.perf_counter()
        sweeps = {} if SWEEPS[name] is None else {"sweeps": SWEEPS[name]}
        starts = draw_starts(x0, lo, hi, plan.layout.physics, args.starts + 1, args.seed,
                             window_times(t[0], t[-1]), ev.costs, plan.layout.n_bins, **sweeps)[1:]
        prep[name] = time.perf_counter() - t0
        runs[name] = fit_starts(name, ev, plan, cfg, starts, lo, hi)
    best, res = best_result(runs.values(), ev, plan, cfg)
    summary = {name: report(name, runs[name], best, res, plan, prep[name]) for name in args.prepare}
    print(f"\n{'starts':<8}{'within 1 sd':>12}{'conv. elsewhere':>17}{'crashed':>9}{'prepare s':>11}"
          f"{'fits s':>8}   (of {args.starts}); load average {os.getloadavg()[0]:.1f}")
    for name, (w, c, x, s) in summary.items():
        print(f"{name:<8}{w:>12}{c:>17}{x:>9}{prep[name]:>11.1f}{s:>8.0f}")


if __name__ == "__main__":
    main()
