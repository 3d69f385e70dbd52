"""Bounded Levenberg–Marquardt / trust-region solver on reduced normal equations.

The solver sees a least-squares problem only through an *evaluator* (DESIGN.md §5):

    normal_equations(x) -> NormalEquations(jtj (P, P), jtr (P,), cost, n)
    costs(xs (m, P))     -> (m,) costs

where cost = ½ Σ r². It never sees residuals, data, tiles or Dask.

Each iteration:
1. scale the problem with D = sqrt(max over iterations of diag(JᵀJ)) (Moré 1978,
   "The Levenberg–Marquardt algorithm: implementation and theory", §3), so that
   parameters whose gradients differ by 10⁶ need no hand-tuned x_scale;
2. for several dampings λ·f (f in ``trial_factors``) solve the bounded subproblem
   min ½ sᵀ(H̃ + λf I)s + g̃ᵀs subject to the box, with an active-set method;
3. evaluate the cost of all trial points in ONE cost-only pass over the data, accept
   the best trial whose actual/predicted reduction ratio ρ exceeds ``accept_ratio``,
   and update λ from its ρ (Nielsen 1999 style: shrink when ρ > 0.75, grow when
   ρ < 0.25); if none is accepted, raise λ and try again — a rejected step never costs
   a Jacobian pass;
4. one normal-equations pass at the accepted point; test convergence.

Convergence (MINPACK's criteria, Moré et al. 1980): relative cost reduction, actual and
predicted, below ``ftol``; scaled step below ``xtol``; or the largest cosine between a
Jacobian column and the residual vector (the projected gradient where a bound is
active) below ``gtol``.

State is explicit: :meth:`TrustRegionLM.init` and :meth:`TrustRegionLM.step` map one
:class:`SolverState` to the next, and :meth:`TrustRegionLM.solve` just loops. A state
reduces to a small mapping of numbers (:meth:`SolverState.saved`: x, the Moré scale,
the damping, the counters), and :meth:`TrustRegionLM.restore` rebuilds the state from it
with one normal-equations pass at x. With a deterministic evaluator the continued
trajectory is then bit for bit the uninterrupted one: a step depends only on x, the
normal equations at x, the scale and the damping. What to do with the mapping (a
checkpoint file) is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np


@dataclass(frozen=True)
class NormalEquations:
    """JᵀJ (P, P), Jᵀr (P,), cost = ½ Σ r² and the number of residuals n at one x."""

    jtj: np.ndarray
    jtr: np.ndarray
    cost: float
    n: int


class Evaluator(Protocol):
    """What the solver needs from a least-squares problem."""

    def normal_equations(self, x: np.ndarray) -> NormalEquations: ...

    def costs(self, xs: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class IterationReport:
    """One line of progress: what the console prints per iteration."""

    iteration: int
    cost: float
    step_norm: float
    damping: float
    rho: float
    passes: int


@dataclass(frozen=True)
class SolverState:
    """Everything the solver carries between iterations (also its checkpoint)."""

    x: np.ndarray
    ne: NormalEquations
    scale: np.ndarray
    damping: float
    iteration: int = 0
    normal_passes: int = 1
    cost_passes: int = 0
    done: bool = False
    converged: bool = False
    termination: str = ""
    history: tuple[IterationReport, ...] = field(default_factory=tuple)

    @property
    def passes(self) -> int:
        return self.normal_passes + self.cost_passes

    def saved(self) -> dict:
        """What :meth:`TrustRegionLM.restore` needs, as plain JSON-ready numbers.

        Returns
        -------
        dict
            ``x`` and ``scale`` (lists of P floats), ``damping``, ``cost`` (at x, for a
            consistency check), ``iteration``, ``normal_passes``, ``cost_passes``,
            ``done``, ``converged``, ``termination``. Floats survive a JSON round trip
            exactly (Python writes the shortest repr that reads back to the same double).
        """
        return {
            "x": [float(v) for v in self.x],
            "scale": [float(v) for v in self.scale],
            "damping": float(self.damping),
            "cost": float(self.ne.cost),
            "iteration": int(self.iteration),
            "normal_passes": int(self.normal_passes),
            "cost_passes": int(self.cost_passes),
            "done": bool(self.done),
            "converged": bool(self.converged),
            "termination": str(self.termination),
        }


def solve_box_qp(H, g, lower, upper, max_iter=None):
    """Minimise ½ sᵀHs + gᵀs subject to lower ≤ s ≤ upper (primal active set).

    Parameters
    ----------
    H : ndarray (n, n)
        Symmetric positive definite.
    g : ndarray (n,)
    lower, upper : ndarray (n,)
        Box with lower ≤ 0 ≤ upper, so s = 0 is feasible (the start).

    Returns
    -------
    s : ndarray (n,)
        The minimiser (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 16.3,
        specialised to bound constraints).
    """
    n = g.size
    max_iter = max_iter or 10 * n + 10
    s = np.zeros(n)
    # Working set: -1 at the lower bound, +1 at the upper bound, 0 free.
    active = np.zeros(n, dtype=int)
    active[(lower >= 0) & (g > 0)] = -1
    active[(upper <= 0) & (g < 0)] = 1
    for _ in range(max_iter):
        free = active == 0
        s[active == -1] = lower[active == -1]
        s[active == 1] = upper[active == 1]
        if free.any():
            rhs = -(g[free] + H[np.ix_(free, ~free)] @ s[~free])
            target = np.linalg.solve(H[np.ix_(free, free)], rhs)
        else:
            target = np.zeros(0)
        current = s[free]
        direction = target - current
        lo, hi = lower[free], upper[free]
        with np.errstate(divide="ignore", invalid="ignore"):
            to_bound = np.where(direction > 0, (hi - current) / direction,
                                np.where(direction < 0, (lo - current) / direction, np.inf))
        alpha = min(1.0, float(to_bound.min())) if to_bound.size else 1.0
        s[free] = current + alpha * direction
        if alpha < 1.0:
            blocking = np.flatnonzero(free)[int(np.argmin(to_bound))]
            active[blocking] = 1 if direction[int(np.argmin(to_bound))] > 0 else -1
            continue
        grad = H @ s + g
        # Lagrange multipliers of the active bounds must push inward.
        wrong = np.where(active == -1, -grad, np.where(active == 1, grad, 0.0))
        k = int(np.argmax(wrong))
        if wrong[k] <= 0:
            break
        active[k] = 0
    return np.clip(s, lower, upper)


def _projected_gradient(g, x, lower, upper):
    """Zero the gradient components that push against an active bound."""
    at_lower = (x <= lower) & (g > 0)
    at_upper = (x >= upper) & (g < 0)
    return np.where(at_lower | at_upper, 0.0, g)


class TrustRegionLM:
    """Bounded Levenberg–Marquardt with multi-damping trial passes.

    Parameters
    ----------
    lower, upper : ndarray (P,)
        Bounds; ±inf allowed. x0 must lie inside.
    ftol, xtol, gtol : float
        Convergence tolerances (see module docstring).
    max_iterations : int
    trial_factors : sequence of float
        Damping multipliers tried together in one cost pass.
    accept_ratio : float
        Minimum actual/predicted reduction to accept a step.
    initial_damping : float
        λ relative to the scaled diagonal (which is 1 at the start).
    callback : callable(IterationReport), optional
        Called after every iteration (progress output).

    Raises
    ------
    ValueError
        If x0 lies outside the bounds or the bounds are inverted.
    """

    def __init__(self, lower, upper, *, ftol=1e-8, xtol=1e-10, gtol=1e-8,
                 max_iterations=200, trial_factors=(1.0, 8.0, 64.0, 512.0),
                 accept_ratio=1e-4, initial_damping=1e-3, max_damping=1e16,
                 callback: Callable[[IterationReport], None] | None = None):
        self.lower = np.asarray(lower, float)
        self.upper = np.asarray(upper, float)
        if np.any(self.lower >= self.upper):
            raise ValueError("every lower bound must be below its upper bound")
        self.ftol, self.xtol, self.gtol = ftol, xtol, gtol
        self.max_iterations = max_iterations
        self.trial_factors = np.asarray(trial_factors, float)
        self.accept_ratio = accept_ratio
        self.initial_damping = initial_damping
        self.max_damping = max_damping
        self.callback = callback

    # -- explicit state and pure steps (optimistix-style) ---------------------------
    def init(self, evaluator: Evaluator, x0) -> SolverState:
        """The state at x0 (P,): one normal-equations pass, the first scale and damping.

        Raises
        ------
        ValueError
            If x0 lies outside the bounds.
        """
        x0 = np.asarray(x0, float)
        if np.any(x0 < self.lower) or np.any(x0 > self.upper):
            raise ValueError("the starting point lies outside the bounds")
        ne = evaluator.normal_equations(x0)
        scale = self._scale(np.ones_like(x0) * 0.0, ne)
        state = SolverState(x=x0, ne=ne, scale=scale, damping=self.initial_damping)
        return self._check_gradient(state)

    def step(self, evaluator: Evaluator, state: SolverState) -> SolverState:
        """One iteration from a state that is not done: trial passes until a step is
        accepted (then one normal-equations pass) or the solver gives up; the new state
        says ``done`` when a convergence test or a limit ends the fit."""
        x, ne, D = state.x, state.ne, state.scale
        Hs = ne.jtj / np.outer(D, D)
        gs = ne.jtr / D
        lo_s = (self.lower - x) * D
        hi_s = (self.upper - x) * D
        damping = state.damping
        cost_passes = state.cost_passes
        while True:
            dampings = damping * self.trial_factors
            steps, preds = [], []
            for lam in dampings:
                s = solve_box_qp(Hs + lam * np.eye(x.size), gs, lo_s, hi_s)
                steps.append(s)
                preds.append(-(gs @ s + 0.5 * s @ Hs @ s))
            trials = np.clip(x + np.array(steps) / D, self.lower, self.upper)
            costs = np.asarray(evaluator.costs(trials), float)
            cost_passes += 1
            preds = np.array(preds)
            actual = ne.cost - costs
            with np.errstate(divide="ignore", invalid="ignore"):
                rho = np.where(preds > 0, actual / preds, -np.inf)
            ok = (rho > self.accept_ratio) & np.isfinite(costs)
            if ok.any():
                k = int(np.flatnonzero(ok)[np.argmin(costs[ok])])
                break
            if np.max(preds) <= 16 * np.finfo(float).eps * ne.cost:
                # Even the largest predicted gain is below rounding of the cost: this is
                # a stationary point to machine precision.
                return replace(state, cost_passes=cost_passes, done=True, converged=True,
                               termination="no reduction possible within floating-point precision")
            damping *= self.trial_factors[-1] * 8.0
            if damping > self.max_damping:
                return replace(
                    state, cost_passes=cost_passes, damping=damping, done=True,
                    converged=False,
                    termination=(
                        "no trial step reduced the cost even at damping "
                        f"{self.max_damping:.0e}; the gradient is not small (not converged)"
                    ),
                )
        s_scaled = steps[k]
        x_new = trials[k]
        lam = dampings[k]
        if rho[k] > 0.75:
            lam /= 3.0
        elif rho[k] < 0.25:
            lam *= 2.0
        new_ne = evaluator.normal_equations(x_new)
        report = IterationReport(
            iteration=state.iteration + 1, cost=float(new_ne.cost),
            step_norm=float(np.linalg.norm(s_scaled)), damping=float(lam),
            rho=float(rho[k]), passes=state.normal_passes + 1 + cost_passes,
        )
        new = replace(
            state, x=x_new, ne=new_ne, scale=self._scale(D, new_ne),
            damping=max(lam, 1e-15), iteration=state.iteration + 1,
            normal_passes=state.normal_passes + 1, cost_passes=cost_passes,
            history=state.history + (report,),
        )
        if self.callback is not None:
            self.callback(report)
        if actual[k] <= self.ftol * ne.cost and preds[k] <= self.ftol * ne.cost:
            return replace(new, done=True, converged=True,
                           termination=f"relative cost reduction below ftol={self.ftol:g}")
        if np.linalg.norm(s_scaled) <= self.xtol * (self.xtol + np.linalg.norm(D * x_new)):
            return replace(new, done=True, converged=True,
                           termination=f"scaled step below xtol={self.xtol:g}")
        new = self._check_gradient(new)
        if not new.done and new.iteration >= self.max_iterations:
            return replace(new, done=True, converged=False,
                           termination=f"reached max_iterations={self.max_iterations} (not converged)")
        return new

    def restore(self, evaluator: Evaluator, saved: dict) -> SolverState:
        """Rebuild a state from :meth:`SolverState.saved` with one normal-equations pass.

        The pass recomputes JᵀJ, Jᵀr and the cost at the saved x; the scale, damping,
        counters and termination are taken as saved, so :meth:`step` continues the
        saved trajectory. ``normal_passes`` counts the restoring pass on top of the
        saved ones; ``history`` starts empty.

        Parameters
        ----------
        evaluator : Evaluator
        saved : dict
            As returned by :meth:`SolverState.saved` (e.g. read back from JSON).

        Raises
        ------
        ValueError
            If ``saved`` lacks a field, has the wrong number of parameters, holds a
            non-finite or non-positive scale or damping, a cost that is not a number,
            or an x outside the bounds.
            Nothing has been evaluated then.
        """
        P = self.lower.size
        try:
            x = np.asarray(saved["x"], dtype=float)
            scale = np.asarray(saved["scale"], dtype=float)
            damping = float(saved["damping"])
            float(saved["cost"])  # checked by the caller against the recomputed cost
            counters = [saved[k] for k in ("iteration", "normal_passes", "cost_passes")]
            flags = [saved[k] for k in ("done", "converged")]
            termination = saved["termination"]
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed field ({exc})") from None
        if x.shape != (P,) or scale.shape != (P,):
            raise ValueError(f"expected {P} parameters, got x {x.shape} and scale {scale.shape}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("x and scale must be finite, scale > 0")
        if not (np.isfinite(damping) and damping > 0):
            raise ValueError(f"damping = {damping!r}: must be finite and > 0")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counters):
            raise ValueError(f"iteration and pass counters must be integers >= 0, got {counters}")
        if not all(isinstance(f, bool) for f in flags) or not isinstance(termination, str):
            raise ValueError("done/converged must be booleans and termination a string")
        if np.any(x < self.lower) or np.any(x > self.upper):
            raise ValueError("x lies outside the bounds")
        iteration, normal_passes, cost_passes = counters
        ne = evaluator.normal_equations(x)
        return SolverState(x=x, ne=ne, scale=scale, damping=damping, iteration=iteration,
                           normal_passes=normal_passes + 1, cost_passes=cost_passes,
                           done=flags[0], converged=flags[1], termination=termination)

    def solve(self, evaluator: Evaluator, x0) -> SolverState:
        """Run :meth:`init` then :meth:`step` until done; return the final state."""
        state = self.init(evaluator, x0)
        while not state.done:
            state = self.step(evaluator, state)
        return state

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _scale(previous: np.ndarray, ne: NormalEquations) -> np.ndarray:
        diag = np.sqrt(np.maximum(np.diag(ne.jtj), 0.0))
        scale = np.maximum(previous, diag)
        # A column that has been exactly zero so far carries no information to scale by.
        return np.where(scale > 0, scale, 1.0)

    def _check_gradient(self, state: SolverState) -> SolverState:
        ne = state.ne
        g = _projected_gradient(ne.jtr, state.x, self.lower, self.upper)
        column_norm = np.sqrt(np.maximum(np.diag(ne.jtj), 0.0))
        residual_norm = np.sqrt(2.0 * ne.cost)
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = np.where(column_norm > 0, np.abs(g) / (column_norm * residual_norm), 0.0)
        if residual_norm == 0 or float(np.max(cosine, initial=0.0)) <= self.gtol:
            return replace(state, done=True, converged=True,
                           termination=f"gradient below gtol={self.gtol:g}")
        return state
