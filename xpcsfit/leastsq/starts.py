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
  enter the model linearly). Each draw's J(t) and gamma_dot(t) then take the amplitude
  and exponent the cost prefers on a grid (:func:`scale_amplitudes`): most raw draws
  lie on the plateau of decorrelated (or never decorrelating) c2, where the gradient
  points nowhere. A draw is a *physical* start when its J(t) is positive over the
  window and its cost is finite and below that of the same start with zero contrast
  (c2 = offset: no correlation at all). Others are replaced by fresh draws (up to
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
  gamma_dot(t) is compared up to its sign (:func:`transport_distance`).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import qmc

from xpcsfit.errors import ConfigError
from xpcsfit.leastsq.determined import DriftLog, determined_quantities
from xpcsfit.model import enable_float64, shear_rate, transport_coefficient

MAX_ROUNDS = 20
LOG_SPAN = 100.0  # bounds ratio above which a positive parameter is drawn on a log scale
# Each transport curve's (prefactor, exponent, offset): the amplitude search's curves.
AMPLITUDE_GROUPS = (("D0", "alpha", "D_offset"), ("gamma_dot_t0", "beta", "gamma_dot_t_offset"))
SCALE_GRID = 25  # log-spaced factors per amplitude search (≈ 8 a decade over D0's 3 decades)
EXPONENT_GRID = 9  # exponents per search, evenly over the bounds (steps of 0.5 over alpha's [-2, 2])
LEVELS = np.geomspace(1 / 8, 8, 7)  # the power law's level, per exponent, relative to the held one
SCALE_SWEEPS = 2  # rounds over the groups: J(t)'s best amplitude depends on gamma_dot(t)'s


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
    u = np.clip(qmc.LatinHypercube(d=np.size(lower), rng=seed).random(n), 1e-3, 1 - 1e-3)
    return _from_unit(u, lower, upper)


def _from_unit(u, lower, upper) -> np.ndarray:
    """u in [0, 1] (..., p) mapped into [lower, upper] (p,): on a log scale for the
    dimensions with 0 < lower and upper/lower > :data:`LOG_SPAN`, linearly otherwise."""
    lo, hi = np.asarray(lower, float), np.asarray(upper, float)
    log = (lo > 0) & (hi > LOG_SPAN * np.where(lo > 0, lo, np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        on_log = np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
    return np.where(log, on_log, lo + u * (hi - lo))


def positive_transport(theta: np.ndarray, times) -> np.ndarray:
    """(n,) bool: J(t) > 0 and finite at every time of the window, for each row of theta (n, p)."""
    # theta's columns as (n, 1) against times (m,): J (n, m) in one broadcast
    J = transport_coefficient(np.atleast_2d(theta).T[:, :, None], np.asarray(times, float))
    with np.errstate(invalid="ignore"):
        return np.all(np.isfinite(J) & (J > 0), axis=1)


def draw_starts(x0, lower, upper, names, n: int, seed: int, times, costs, n_bins: int,
                sweeps: int = SCALE_SWEEPS) -> np.ndarray:
    """The n starts (n, P): x0 first, then Latin hypercube draws of the physics
    parameters (the rest as in x0), each transport curve's amplitude then chosen by the
    cost (:func:`scale_amplitudes`), kept when they are physical starts (see the module
    docstring).

    Parameters
    ----------
    x0, lower, upper : ndarray (P,)
    names : sequence of str
        The physics parameters' names: the first p = len(names) entries of x.
    n : int (≥ 1)
    seed : int
    times : ndarray
        The window, s.
    costs : callable(xs (m, P)) -> (m,)
        One cost pass (the fit's evaluator).
    n_bins : int
        Number of (q, phi) bins: x[p : p + n_bins] are the contrasts.
    sweeps : int
        :func:`scale_amplitudes`' sweeps; 0 keeps the raw draws (benchmarks/bench_starts.py).

    Raises
    ------
    ConfigError
        If :data:`MAX_ROUNDS` rounds do not give n − 1 physical starts (bounds that
        leave almost no positive J(t)).
    """
    p = len(names)
    starts = [np.asarray(x0, float)]
    for round_ in range(MAX_ROUNDS):
        need = n - len(starts)
        if need <= 0:
            break
        # One design per round, seeded from (seed, round): reproducible, and the first
        # round alone is a Latin hypercube when every draw is physical.
        draws = latin_hypercube(lower[:p], upper[:p], need, np.random.default_rng([seed, round_]))
        draws = draws[positive_transport(draws, times)]
        if not len(draws):
            continue
        xs = np.tile(np.asarray(x0, float), (len(draws), 1))
        xs[:, :p] = draws
        xs = scale_amplitudes(xs, lower, upper, names, times, costs, sweeps=sweeps)
        flat = xs.copy()
        flat[:, p : p + n_bins] = 0.0
        c = np.asarray(costs(np.concatenate([xs, flat])), float)
        m = len(xs)
        starts += list(xs[np.isfinite(c[:m]) & (c[:m] < c[m:])])
    if len(starts) < n:
        raise ConfigError(f"starts = {n}: after {MAX_ROUNDS} rounds of Latin hypercube draws only "
                          f"{len(starts) - 1} were physical starts (positive J(t), a model closer to the "
                          "data than no correlation); narrow the bounds to plausible values")
    return np.array(starts[:n])


def inner_bounds(lower, upper) -> tuple[np.ndarray, np.ndarray]:
    """[lower, upper] (P,) shrunk by 1e-3 of the width on the scale starts are drawn on
    (:func:`latin_hypercube`): a start on a bound may be held there by the active set,
    and a linear margin would lift gamma_dot_t0's floor from 1e-6 to 5e-4 1/s, above
    typical shear rates."""
    return tuple(_from_unit(np.array([1e-3, 1 - 1e-3])[:, None], lower, upper))


def amplitude_factors(x, inner_lo, inner_hi, group, times, grid: int) -> np.ndarray:
    """``grid`` log-spaced factors s, and 1, (grid + 1,) for one transport curve of x (P,):
    those that put the curve's amplitude (the largest magnitude of its power-law term
    over ``times`` plus its offset's) between the prefactor's lower bound and the
    largest magnitude the bounds allow either term; all ones for a zero curve.

    ``group``: the indices (prefactor, exponent, offset) of J(t) or gamma_dot(t) in x;
    ``inner_lo``, ``inner_hi`` (P,): :func:`inner_bounds`."""
    i0, ia, io = group
    amplitude = np.max(np.abs(x[i0] * np.asarray(times, float) ** x[ia])) + abs(x[io])
    largest = np.max(np.abs([inner_lo[i0], inner_hi[i0], inner_lo[io], inner_hi[io]]))
    smallest = inner_lo[i0] if inner_lo[i0] > 0 else 1e-6 * largest
    if not (np.isfinite(amplitude) and amplitude > 0):
        return np.ones(grid + 1)
    return np.append(np.geomspace(smallest / amplitude, largest / amplitude, grid), 1.0)


def scale_amplitudes(starts, lower, upper, names, times, costs, grid: int = SCALE_GRID,
                     sweeps: int = SCALE_SWEEPS) -> np.ndarray:
    """The starts with each transport curve's amplitude chosen by a search on the cost.

    For J(t) (D0, alpha, D_offset) and gamma_dot(t) (gamma_dot_t0, beta,
    gamma_dot_t_offset) in turn, ``sweeps`` rounds of three searches, each keeping the
    lowest cost of its candidates and the start itself: the amplitude (prefactor and
    offset multiplied by each factor of :func:`amplitude_factors`), the exponent
    (:data:`EXPONENT_GRID` values evenly over its bounds, each with the power-law term's
    largest magnitude over the window held and multiplied by each of :data:`LEVELS`)
    and the prefactor alone (``grid`` log-spaced values over its bounds: how the curve
    splits between power law and offset).
    Candidates are clipped into :func:`inner_bounds` (a term on its bound keeps it
    while the other carries the amplitude); those with J(t) ≤ 0 somewhere in ``times``
    are dropped.

    Why: most Latin hypercube draws over the default bounds (D0 over three decades,
    gamma_dot_t0 up to 0.5 1/s, offsets of either sign) decorrelate c2 within a frame or
    not at all over the window. There the cost is a plateau (~1.5·10⁶ noise units
    above the best on flow_small q8), the gradient points nowhere and the solver stops
    where it started (issue 13: 1 of 17 random starts reached the best). The data fix
    each curve's amplitude (the decorrelation time) almost directly, and its shape (the
    exponent, the offset's sign relative to the power law, phi0) is what different
    starts should explore: so a draw keeps its shape and takes the amplitude the data
    prefer. A grid of factors, not a local search: the cost along s is flat on both
    sides of the well. The cost never rises (the start is among the candidates).

    Parameters
    ----------
    starts : ndarray (n, P)
        Drawn starts.
    lower, upper : ndarray (P,)
    names : sequence of str
        The physics parameter names, in the order of x[:p]; a curve with a name not in
        it is skipped (static mode has no gamma_dot(t)).
    times : ndarray
        The window, s.
    costs : callable(xs (m, P)) -> (m,)
        One cost pass; called three times per curve and sweep, with at most
        n·(grid + 2), n·(EXPONENT_GRID·len(LEVELS) + 1) and n·(grid + 1) rows (those
        with J(t) > 0).
    grid, sweeps : int

    Returns
    -------
    ndarray (n, P)
    """
    xs = np.array(starts, float)
    p, t = len(names), np.asarray(times, float)
    inner_lo, inner_hi = inner_bounds(lower, upper)
    groups = [[list(names).index(k) for k in g] for g in AMPLITUDE_GROUPS if all(k in names for k in g)]
    for _ in range(sweeps if len(xs) else 0):
        for group in groups:
            i0, ia, io = group
            factors = np.array([amplitude_factors(x, inner_lo, inner_hi, group, times, grid) for x in xs])
            trial = np.repeat(xs[:, None, :], grid + 1, axis=1)
            trial[..., [i0, io]] *= factors[..., None]
            xs = _lowest(xs, trial, inner_lo, inner_hi, p, times, costs)
            # the exponent, with the power-law term's largest magnitude over the window
            # held and then varied around it: a new shape matches the data at another level
            exponents = np.linspace(inner_lo[ia], inner_hi[ia], EXPONENT_GRID)
            largest = np.max(np.abs(xs[:, i0, None] * t[None, :] ** xs[:, ia, None]), axis=1)  # (n,)
            level = np.sign(xs[:, i0, None]) * largest[:, None] / np.max(
                t[None, None, :] ** exponents[None, :, None], axis=2)  # (n, EXPONENT_GRID)
            trial = np.repeat(xs[:, None, :], EXPONENT_GRID * len(LEVELS), axis=1)
            trial[..., ia] = np.repeat(exponents, len(LEVELS))
            trial[..., i0] = (level[:, :, None] * LEVELS).reshape(len(xs), -1)
            xs = _lowest(xs, trial, inner_lo, inner_hi, p, times, costs)
            # the prefactor alone: how the curve splits between power law and offset
            if inner_lo[i0] > 0:
                trial = np.repeat(xs[:, None, :], grid, axis=1)
                trial[..., i0] = np.geomspace(inner_lo[i0], inner_hi[i0], grid)
                xs = _lowest(xs, trial, inner_lo, inner_hi, p, times, costs)
    return xs


def _lowest(xs, trial, inner_lo, inner_hi, p, times, costs) -> np.ndarray:
    """Per start, the lowest-cost row of ``trial`` (n, m, P) clipped into the inner
    bounds, or xs (n, P) itself where none is lower; rows with J(t) ≤ 0 in ``times``
    are not candidates."""
    n, m, P = trial.shape
    trial = np.concatenate([np.clip(trial, inner_lo, inner_hi), xs[:, None, :]], axis=1)
    flat = trial.reshape(-1, P)
    ok = positive_transport(flat[:, :p], times)  # the starts' own rows among them: never empty
    c = np.full(len(flat), np.inf)
    c[ok] = np.asarray(costs(flat[ok]), float)  # no cost pass for rows that cannot be chosen
    c = np.where(np.isfinite(c), c, np.inf).reshape(n, m + 1)
    return trial[np.arange(n), np.argmin(c, axis=1)]


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


def transport_distance(theta, reference, transport: dict, flow: bool) -> tuple[float, float]:
    """The largest distances over the window between the J(t) and gamma_dot(t) of theta
    (p,) and of reference (p,), in the standard errors of ``transport`` (a FitResult's:
    ``t``, ``J_stderr``, ``gamma_dot_stderr``); gamma_dot's 0 in static mode.

    gamma_dot(t) is compared up to its sign: c2 depends on the shear only through
    sinc²(q L cos(phi0 − phi) Γ / 2) (DESIGN.md §2), even in the strain Γ, so gamma_dot(t)
    and −gamma_dot(t) (gamma_dot_t0 and gamma_dot_t_offset negated) give the same c2 and
    the data cannot tell them apart. Times without a standard error (NaN) are left out; an
    infinite distance (a non-finite curve, or a zero standard error) is infinite."""
    t = transport["t"]

    def largest(d, key):
        with np.errstate(divide="ignore", invalid="ignore"):
            d = d / transport[f"{key}_stderr"]
            return float(np.nanmax(np.where(np.isfinite(d) | np.isnan(d), d, np.inf)))

    J = largest(np.abs(transport_coefficient(theta, t) - transport_coefficient(reference, t)), "J")
    if not flow:
        return J, 0.0
    g, g_ref = shear_rate(theta, t), shear_rate(reference, t)
    return J, min(largest(np.abs(g - g_ref), "gamma_dot"), largest(np.abs(g + g_ref), "gamma_dot"))


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
        ``record``: ``n``, ``seed``, ``sampling``, ``compared``, ``best`` (index), ``reached_best``
        (how many ended within the best's 1-sigma bands of J(t) and gamma_dot(t), the
        best included), ``distinct_minima`` (groups of converged starts outside them:
        ``starts``, ``delta_chi2`` of the lowest, its J/gamma_dot distance in sigmas) and
        ``runs`` (per start: ``start`` physics values, ``cost``, ``delta_chi2``,
        ``termination``, ``converged``, ``iterations``, ``data_passes``, ``J_sigmas``,
        ``gamma_dot_sigmas``, ``reached``, ``drifted``, ``error``).
    """
    tr = result.transport
    flow = result.mode == "laminar_flow"
    best_cost = outcomes[best]["state"]["cost"]
    p = len(result.names)
    theta_best = np.asarray(outcomes[best]["state"]["x"][:p], float)

    runs = []
    for i, o in enumerate(outcomes):
        run = {"start": dict(zip(result.names, map(float, starts[i][:p]))), "error": o["error"]}
        if o["error"] is None:
            s = o["state"]
            theta = np.asarray(s["x"][:p], float)
            J_sig, g_sig = transport_distance(theta, theta_best, tr, flow)
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
                    "the bounds (log scale for positive bounds spanning > 2 decades), then each transport "
                    "curve's amplitude and exponent chosen on a grid by the cost, positive J(t) over the "
                    "window, contrast and offset from the data",
        "compared": "J(t) and gamma_dot(t) over the window in the best's standard errors; gamma_dot(t) up "
                    "to its sign (c2 is even in the shear)",
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
    others = sorted((i for i, r in enumerate(runs) if r["error"] is None and r["converged"] and not r["reached"]),
                    key=lambda i: runs[i]["cost"])
    theta = {i: np.asarray(list(runs[i]["values"].values()), float) for i in others}
    groups: list[list[int]] = []
    for i in others:
        for g in groups:
            if max(transport_distance(theta[i], theta[g[0]], tr, flow)) <= 1.0:
                g.append(i)
                break
        else:
            groups.append([i])
    return [{"starts": g, "delta_chi2": runs[g[0]]["delta_chi2"], "J_sigmas": runs[g[0]]["J_sigmas"],
             "gamma_dot_sigmas": runs[g[0]]["gamma_dot_sigmas"], "values": runs[g[0]]["values"]} for g in groups]
