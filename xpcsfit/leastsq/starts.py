"""Fits from several starts: Latin hypercube starts inside the bounds, run as parallel
fits on the cluster, the best kept, the others compared with it in honest units.

Why: the least-squares cost of a two-time map has valleys (D0/D_offset at alpha ≈ 0,
the two shear terms) and, from far starts, distinct local minima (e.g. gamma_dot(t)
several times the truth with a compensating J(t)). One fit cannot tell a scientist
whether its minimum is the lowest; N fits from spread-out starts can.

- Starts: start 0 is the fit's usual start (config values, data-driven estimates);
  starts 1 … N−1 draw the physics parameters by Latin hypercube sampling (McKay,
  Beckman & Conover 1979; scipy.stats.qmc.LatinHypercube) inside the bounds, on a log
  scale for a parameter whose bounds are positive and span more than two decades
  (D0, gamma_dot_t0 by default: a uniform draw would put 90 % of starts in the top
  decade), linearly otherwise; contrast and offset start from the data estimates (they
  enter the model linearly). A draw is a *physical* start when its J(t) is positive
  over the window and its cost is finite and below that of the same start with zero
  contrast (c2 = offset: no correlation at all). A draw on that plateau — e.g. a shear
  rate that decorrelates the speckle within a frame — has no gradient towards the data
  and can only stop where it started. Others are replaced by fresh draws (up to
  :data:`MAX_ROUNDS` rounds); one cost pass per round judges all draws.
- Each start's fit is one task (:func:`solve_start`) that loads the selection's tiles
  on its worker and runs the solver there with the fit's options and convergence test;
  the tasks run in parallel, one per worker thread. A start that fails is recorded
  with its error, never ends the fit.
- The best (lowest cost) is restored on the fit's evaluator and reported as the fit.
  Every other start is compared with it: Δχ² (:func:`delta_chi2`) and the largest
  distance of its J(t) and gamma_dot(t) from the best's, in the best's 1-sigma bands,
  over the window. A start within one band everywhere *reached* the best; one that
  converged outside it found a *distinct minimum* (a warning names them with Δχ²).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import qmc

from xpcsfit.errors import ConfigError
from xpcsfit.leastsq.determined import DriftLog, determined_quantities
from xpcsfit.model import enable_float64, shear_rate, transport_coefficient

MAX_ROUNDS = 20
LOG_SPAN = 100.0  # bounds ratio above which a positive parameter is drawn on a log scale


def delta_chi2(cost, best_cost: float, dof: int):
    """Cost differences as Δχ² in units of the noise: 2·(cost − best_cost)/σ² with the
    noise variance estimated from the best fit, σ² = 2·best_cost/dof. The cost is
    weighted by the per-bin noise level (cost = ½ Σ w r², w = 1/σ_k²), so σ² is the best
    fit's reduced chi² (≈ 1 for a model that describes the data) and this is 2·Δcost
    scaled by it: a misfit model does not make distinct minima look significant.
    Δχ² < 1 cannot be told apart by the data.

    Parameters
    ----------
    cost : float or ndarray
    best_cost : float (> 0)
    dof : int (> 0)
    """
    return 2.0 * (np.asarray(cost, float) - best_cost) / (2.0 * best_cost / dof)


def latin_hypercube(lower, upper, n: int, seed) -> np.ndarray:
    """n points (n, p) inside the box [lower, upper] (p,) by Latin hypercube sampling,
    on a log scale for dimensions with 0 < lower and upper/lower > :data:`LOG_SPAN`, and
    at least 1e-3 of the width (on that scale) away from the bounds (a start on a bound
    may be held there by the active set). ``seed``: anything numpy.random.default_rng takes."""
    lo, hi = np.asarray(lower, float), np.asarray(upper, float)
    u = np.clip(qmc.LatinHypercube(d=lo.size, rng=seed).random(n), 1e-3, 1 - 1e-3)
    log = (lo > 0) & (hi > LOG_SPAN * np.where(lo > 0, lo, np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        on_log = np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
    return np.where(log, on_log, lo + u * (hi - lo))


def positive_transport(theta: np.ndarray, times) -> np.ndarray:
    """(n,) bool: J(t) > 0 and finite at every time of the window, for each row of theta (n, p)."""
    J = np.stack([transport_coefficient(th, np.asarray(times, float)) for th in np.atleast_2d(theta)])
    return np.all(np.isfinite(J) & (J > 0), axis=1)


def draw_starts(x0, lower, upper, p: int, n: int, seed: int, times, costs, n_bins: int) -> np.ndarray:
    """The n starts (n, P): x0 first, then Latin hypercube draws of the p physics
    parameters (the rest as in x0) that are physical starts (see the module docstring).

    Parameters
    ----------
    x0, lower, upper : ndarray (P,)
    p : int
        Number of physics parameters (the first p entries).
    n_bins : int
        Number of (q, phi) bins: x[p : p + n_bins] are the contrasts.
    n : int (≥ 1)
    seed : int
    times : ndarray
        The window, s.
    costs : callable(xs (m, P)) -> (m,)
        One cost pass (the fit's evaluator).

    Raises
    ------
    ConfigError
        If :data:`MAX_ROUNDS` rounds do not give n − 1 physical starts (bounds that
        leave almost no positive J(t)).
    """
    starts = [np.asarray(x0, float)]
    for round_ in range(MAX_ROUNDS):
        need = n - len(starts)
        if need <= 0:
            break
        # One design per round, seeded from (seed, round): reproducible, and the first
        # round alone is a Latin hypercube when every draw is physical.
        draws = latin_hypercube(lower[:p], upper[:p], need, np.random.default_rng([seed, round_]))
        xs = np.tile(np.asarray(x0, float), (need, 1))
        xs[:, :p] = draws
        ok = positive_transport(draws, times)
        if ok.any():
            flat = xs[ok].copy()
            flat[:, p : p + n_bins] = 0.0
            c = np.asarray(costs(np.concatenate([xs[ok], flat])), float)
            m = int(ok.sum())
            informative = np.isfinite(c[:m]) & (c[:m] < c[m:])
            ok[np.flatnonzero(ok)[~informative]] = False
        starts += list(xs[ok])
    if len(starts) < n:
        raise ConfigError(f"starts = {n}: after {MAX_ROUNDS} rounds of Latin hypercube draws only "
                          f"{len(starts) - 1} were physical starts (positive J(t), a model closer to the "
                          "data than no correlation); narrow the bounds to plausible values")
    return np.array(starts[:n])


def solve_start(specs, layout, mode: str, L: float, options: dict, times, x0, lower, upper,
                bin_weight=None) -> dict:
    """Worker task: one start's fit, in this process, over the selection's tiles.

    Loads the tiles of ``specs`` (:meth:`TileSpec.load`), runs
    :class:`~xpcsfit.solver.TrustRegionLM` with ``options`` and the fit's convergence
    test (:func:`~xpcsfit.leastsq.determined.determined_quantities` at ``times``) from
    x0 (P,) inside [lower, upper], with the fit's per-bin weights ``bin_weight``
    (n_bins,) or None, so that every start minimises the same cost.

    Returns
    -------
    dict
        ``state`` (:meth:`SolverState.saved` of the final state), ``message``,
        ``converged``, ``drifted`` ({name: relative drift over ``drift_iterations``}) and
        ``error`` None; or, if the
        fit failed, ``error`` (the exception's type and message) and ``state`` None.
    """
    from xpcsfit.engine.evaluator import InProcessEvaluator
    from xpcsfit.solver import TrustRegionLM

    enable_float64()
    try:
        evaluator = InProcessEvaluator([s.load() for s in specs], layout, mode, L)
        evaluator.bin_weight = bin_weight
        solver = TrustRegionLM(lower, upper, quantities=determined_quantities(layout, mode, times), **options)
        drift = DriftLog(layout.physics, lower, upper)
        state = solver.init(evaluator, x0)
        drift.add(state.x, state.settled_steps)
        while not solver.terminate(state)[0]:
            state = solver.step(evaluator, state)
            drift.add(state.x, state.settled_steps)
    except Exception as exc:  # a start's failure is reported in fit.json, never ends the fit
        return {"state": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"state": state.saved(), "message": solver.message(state), "converged": bool(state.converged),
            "drifted": drift.drifted(), "drift_iterations": drift.iterations, "error": None}


def run_starts(client, specs, layout, mode: str, L: float, options: dict, times, starts, lower, upper,
               bin_weight=None) -> list[dict]:
    """Run :func:`solve_start` for every row of ``starts`` (n, P) as parallel tasks on
    ``client`` (None: one after another in this process, for ``fit(in_process=True)``);
    the outcomes in start order."""
    if client is None:
        return [solve_start(specs, layout, mode, L, options, times, x, lower, upper, bin_weight) for x in starts]
    futures = [client.submit(solve_start, specs, layout, mode, L, options, times, x, lower, upper, bin_weight,
                             pure=False, key=f"xpcsfit-start-{i}-{np.random.default_rng().integers(2**62)}")
               for i, x in enumerate(starts)]
    return client.gather(futures)


def best_start(outcomes: list[dict]) -> int:
    """Index of the outcome with the lowest finite cost.

    Raises
    ------
    ConfigError
        If every start failed (each error named).
    """
    costs = [o["state"]["cost"] if o["error"] is None else np.inf for o in outcomes]
    costs = [c if np.isfinite(c) else np.inf for c in costs]
    if not np.isfinite(min(costs)):
        raise ConfigError("every start failed: " + "; ".join(
            f"start {i}: {o['error'] or 'non-finite cost'}" for i, o in enumerate(outcomes)))
    return int(np.argmin(costs))


def starts_record(outcomes, starts, best: int, result, seed: int) -> tuple[dict, list[str]]:
    """fit.json's ``starts`` and the warnings about distinct minima and failed starts.

    Parameters
    ----------
    outcomes : list of dict
        From :func:`run_starts`.
    starts : ndarray (n, P)
    best : int
    result : FitResult
        The fit at the best start: its ``transport`` (J(t), gamma_dot(t) and their
        standard errors over the window) and ``dof``.
    seed : int

    Returns
    -------
    (record, warnings)
        ``record``: ``n``, ``seed``, ``sampling``, ``best`` (index), ``reached_best``
        (how many ended within the best's 1-sigma bands of J(t) and gamma_dot(t), the
        best included), ``distinct_minima`` (groups of converged starts outside them:
        ``starts``, ``delta_chi2`` of the lowest, its J/gamma_dot distance in sigmas) and
        ``runs`` (per start: ``start`` physics values, ``cost``, ``delta_chi2``,
        ``termination``, ``converged``, ``iterations``, ``data_passes``, ``J_sigmas``,
        ``gamma_dot_sigmas``, ``reached``, ``drifted``, ``error``).
    """
    tr = result.transport
    t = tr["t"]
    flow = result.mode == "laminar_flow"
    best_cost = outcomes[best]["state"]["cost"]
    p = len(result.names)

    def sigmas(curve, key):
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.abs(curve - tr[key]) / tr[f"{key}_stderr"]
        return float(np.nanmax(np.where(np.isfinite(d) | np.isnan(d), d, np.inf)))

    runs = []
    for i, o in enumerate(outcomes):
        run = {"start": dict(zip(result.names, map(float, starts[i][:p]))), "error": o["error"]}
        if o["error"] is None:
            s = o["state"]
            theta = np.asarray(s["x"][:p], float)
            J_sig = sigmas(transport_coefficient(theta, t), "J")
            g_sig = sigmas(shear_rate(theta, t), "gamma_dot") if flow else 0.0
            run |= {"cost": s["cost"], "delta_chi2": float(delta_chi2(s["cost"], best_cost, result.dof)),
                    "termination": o["message"], "converged": o["converged"], "iterations": s["iteration"],
                    "data_passes": s["normal_passes"] + s["cost_passes"], "J_sigmas": J_sig,
                    "gamma_dot_sigmas": g_sig, "reached": bool(i == best or max(J_sig, g_sig) <= 1.0),
                    "drifted": o["drifted"], "values": dict(zip(result.names, map(float, theta)))}
        runs.append(run)
    distinct = _group_distinct(runs, p, result, flow)
    record = {
        "n": len(outcomes), "seed": seed,
        "sampling": "start 0: the usual start; others: Latin hypercube of the physics parameters inside "
                    "the bounds (log scale for positive bounds spanning > 2 decades), positive J(t) over "
                    "the window, contrast and offset from the data",
        "best": best, "reached_best": sum(bool(r.get("reached")) for r in runs),
        "distinct_minima": distinct, "runs": runs,
    }
    warnings = []
    for group in distinct:
        warnings.append(f"{_starts(group['starts'])} converged at a distinct minimum "
                        f"(Δχ² = {group['delta_chi2']:.3g} in noise units, J(t) {group['J_sigmas']:.3g} and "
                        f"gamma_dot(t) {group['gamma_dot_sigmas']:.3g} standard errors from the best)")
    failed = [i for i, r in enumerate(runs) if r["error"] is not None]
    if failed:
        warnings.append(f"{_starts(failed)} failed: "
                        + "; ".join(runs[i]["error"] for i in failed))
    unfinished = [i for i, r in enumerate(runs) if r["error"] is None and not r["converged"] and not r["reached"]]
    if unfinished:
        warnings.append(f"{_starts(unfinished)} did not converge and ended away from the best")
    return record, warnings


def _starts(indices) -> str:
    """'start 3' or 'starts 1, 4'."""
    return f"start {indices[0]}" if len(indices) == 1 else f"starts {', '.join(map(str, indices))}"


def _group_distinct(runs, p, result, flow) -> list[dict]:
    """Converged runs that did not reach the best, grouped by mutual agreement (J(t)
    and gamma_dot(t) within one of the best's standard errors), lowest cost first."""
    tr = result.transport
    t = tr["t"]
    others = sorted((i for i, r in enumerate(runs) if r["error"] is None and r["converged"] and not r["reached"]),
                    key=lambda i: runs[i]["cost"])
    curves = {}
    for i in others:
        theta = np.asarray(list(runs[i]["values"].values()), float)
        curves[i] = (transport_coefficient(theta, t), shear_rate(theta, t) if flow else np.zeros_like(t))
    groups: list[list[int]] = []
    for i in others:
        for g in groups:
            J0, g0 = curves[g[0]]
            J1, g1 = curves[i]
            close = np.max(np.abs(J1 - J0) / tr["J_stderr"]) <= 1.0 and (
                not flow or np.max(np.abs(g1 - g0) / tr["gamma_dot_stderr"]) <= 1.0)
            if close:
                g.append(i)
                break
        else:
            groups.append([i])
    return [{"starts": g, "delta_chi2": runs[g[0]]["delta_chi2"], "J_sigmas": runs[g[0]]["J_sigmas"],
             "gamma_dot_sigmas": runs[g[0]]["gamma_dot_sigmas"], "values": runs[g[0]]["values"]} for g in groups]
