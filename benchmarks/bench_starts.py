"""Random starts on flow_small (q index 8, laminar_flow): how many reach the best fit.

Issue 13 item 6's experiment. The starts are those of ``xpcsfit fit --starts N``
(:func:`xpcsfit.leastsq.starts.draw_starts`: Latin hypercube of the physics parameters
inside the default bounds, physical starts only, contrast and offset from the data);
each is fitted in this process (the in-process evaluator, one start after another) with
the fit's solver under two termination rules, side by side:

- ``minpack``: MINPACK's tests alone (ftol, xtol, gtol, max_iterations) — the rule
  before issue 13;
- ``determined``: the fit's rule now (MINPACK's tests plus DETERMINED, judged by J(t),
  gamma_dot(t), phi0, contrast and offset over the window).

Per rule it prints, per start, the termination, iterations, Δχ² from the best start
(noise units, :func:`xpcsfit.leastsq.starts.delta_chi2`) and the largest distance of
J(t) and gamma_dot(t) from the best's over the window in the best's standard errors;
then how many ended within one standard error of the best (both curves), how many
claimed convergence elsewhere, and how many raised. A rule's failures are caught and
counted, never end the run.

Usage: python benchmarks/bench_starts.py [--starts 17] [--seed 0] [--rules minpack determined]
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
from xpcsfit.leastsq.starts import delta_chi2, draw_starts
from xpcsfit.model import enable_float64, shear_rate, transport_coefficient
from xpcsfit.solver import TrustRegionLM

FLOW = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "flow_small.hdf")


def run_rule(rule, ev, plan, cfg, starts, lo, hi):
    solver = driver._solver(lo, hi, plan.ds, cfg, plan.layout)
    if rule == "minpack":
        solver = TrustRegionLM(lo, hi, **cfg.solver.model_dump())
    out = []
    for x0 in starts:
        t0 = time.perf_counter()
        try:
            state = solver.solve(ev, x0)
            out.append({"state": state, "message": solver.message(state), "s": time.perf_counter() - t0})
            print(f"  {rule} start {len(out) - 1}: {state.termination.value}, {state.iteration} iterations, "
                  f"cost {state.ne.cost:.10g}, {out[-1]['s']:.0f} s", flush=True)
        except Exception as exc:  # counted: the experiment asks how many crash
            out.append({"error": f"{type(exc).__name__}: {exc}", "s": time.perf_counter() - t0})
            print(f"  {rule} start {len(out) - 1}: raised {out[-1]['error']}", flush=True)
    return out


def report(rule, runs, ev, plan, cfg):
    ok = [r for r in runs if "error" not in r and np.isfinite(r["state"].ne.cost)]
    best = min(ok, key=lambda r: r["state"].ne.cost)
    # the best's bands: its FitResult (covariance at its final normal equations)
    ev.normal_equations(best["state"].x)
    res = driver._result(best["state"], best["message"], ev, plan.ds, cfg, plan.layout)
    tr = res.transport
    t = tr["t"]
    within = claimed_elsewhere = 0
    print(f"\n== rule {rule}: best cost {best['state'].ne.cost:.10g}, "
          f"J sd/J {np.median(tr['J_stderr'] / tr['J']):.2%}, gamma_dot sd/gamma_dot "
          f"{np.median(tr['gamma_dot_stderr'] / tr['gamma_dot']):.2%} (median over the window)")
    print(f"{'start':>5} {'termination':<16} {'conv':>5} {'iter':>5} {'passes':>6} {'s':>6} {'dchi2':>12} "
          f"{'J sd':>9} {'gdot sd':>9}")
    for i, r in enumerate(runs):
        if "error" in r:
            print(f"{i:5d} CRASH {r['error']}")
            continue
        st = r["state"]
        theta = st.x[: plan.layout.p]
        dJ = np.max(np.abs(transport_coefficient(theta, t) - tr["J"]) / tr["J_stderr"])
        dg = np.max(np.abs(shear_rate(theta, t) - tr["gamma_dot"]) / tr["gamma_dot_stderr"])
        near = dJ <= 1 and dg <= 1
        within += near
        claimed_elsewhere += st.converged and not near
        print(f"{i:5d} {st.termination.value:<16} {st.converged!s:>5} {st.iteration:5d} {st.passes:6d} "
              f"{r['s']:6.1f} {float(delta_chi2(st.ne.cost, best['state'].ne.cost, res.dof)):12.4g} "
              f"{dJ:9.3g} {dg:9.3g}")
    crashes = sum("error" in r for r in runs)
    print(f"rule {rule}: {within}/{len(runs)} within one sd of the best J(t) and gamma_dot(t); "
          f"{claimed_elsewhere} converged elsewhere; {crashes} crashed; "
          f"{sum(r['s'] for r in runs):.0f} s in all")
    return within, claimed_elsewhere, crashes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=17)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", nargs="+", default=["minpack", "determined"], choices=["minpack", "determined"])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    enable_float64()
    cfg = load_config(None, mode="laminar_flow")
    plan = driver._plan(FLOW, cfg, dict(q=None, q_index=8, phi=None, frames=None, dt=None))
    ev = InProcessEvaluator([s.load() for s in plan.specs], plan.layout, cfg.mode, plan.L)
    x0, lo, hi = driver._starting_point(ev, plan.ds, cfg, plan.layout, plan.L)
    t = plan.ds["t1"].values
    starts = draw_starts(x0, lo, hi, plan.layout.p, args.starts + 1, args.seed, window_times(t[0], t[-1]),
                         ev.costs, plan.layout.n_bins)[1:]  # the random ones only
    print(f"flow_small q8: {plan.n_points:,} points, {len(starts)} Latin hypercube starts (seed {args.seed}); "
          f"load average {os.getloadavg()[0]:.1f}")
    summary = {rule: report(rule, run_rule(rule, ev, plan, cfg, starts, lo, hi), ev, plan, cfg) for rule in args.rules}
    print(f"\n{'rule':<12}{'within 1 sd':>12}{'conv. elsewhere':>17}{'crashed':>9}   (of {len(starts)}); "
          f"load average {os.getloadavg()[0]:.1f}")
    for rule, (w, c, x) in summary.items():
        print(f"{rule:<12}{w:>12}{c:>17}{x:>9}")


if __name__ == "__main__":
    main()
