"""Bounded Levenberg–Marquardt / trust-region solver on reduced normal equations.

The solver sees a least-squares problem only through an evaluator
(:class:`~xpcsfit.engine.sums.Evaluator`, DESIGN.md §5):

    normal_equations(x) -> NormalEquations(jtj (P, P), jtr (P,), cost, n)
    costs(xs (m, P))     -> (m,) costs

where cost = ½ Σ r². It never sees residuals, data, tiles or Dask.

Each iteration (:meth:`TrustRegionLM.step`):
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
active) below ``gtol``. Why the solver stopped is a :class:`Termination`; its message
(the ``termination`` of fit.json) is derived from it and the options.

What the data determine (``quantities``). Where some parameter combinations are not
determined (a valley of near-equal cost), MINPACK's tests stop on a slow crawl along the
valley, or never. Given a map x ↦ (q(x) (k,), ∂q/∂x = G (k, P)) of quantities the
caller knows to be determined (the driver: J(t) and gamma_dot(t) over the window,
phi0, contrast, offset), the solver also stops when the data can no longer tell its
steps apart. With the noise variance estimated from the residuals, σ² = 2·cost/(n − P),
and the covariance C = σ² (JᵀJ)⁺ (eigen-floored, so that an undetermined direction
gets a huge variance, not zero), each quantity has the standard error
s_k = sqrt(G_k C G_kᵀ). An accepted step is *settled* when it

- changed every q_k by at most ``qtol``·s_k, and
- reduced χ² by at most ``qtol`` in units of the noise: 2·Δcost/σ² ≤ qtol.

After ``settle_steps`` settled steps in a row the fit has converged (``DETERMINED``):
what still moves moves along directions the data do not determine. The χ² test is
what keeps a crawl far from the optimum going: there every step gains many noise units
(a Δχ² of 1 is what one standard error means), while in a flat valley it gains a
small fraction of one. The remaining motion along the valley is not bounded by this
test; the caller reports which parameters still drifted.

Failures inside a step are rejected steps, never exceptions: a trial whose subproblem
cannot be factorised (``numpy.linalg.LinAlgError``) or whose step or cost is not finite
is not accepted, and an accepted point whose normal equations are not finite is
rejected after its pass; the damping grows (a smaller trust region) as for any rejected
step.

State is explicit (optimistix's shape): ``init`` makes a :class:`SolverState`, ``step``
maps one state to the next, ``terminate`` says whether and why it is done; ``solve``
loops. :meth:`SolverState.saved` reduces a state to a few numbers (x, the Moré scale,
the damping, the counters, the termination) and :meth:`TrustRegionLM.restore` rebuilds
it with one normal-equations pass at x: with a deterministic evaluator the continued
trajectory is bit for bit the uninterrupted one (a step depends only on x, the normal
equations at x, the scale and the damping). Storing the mapping is the caller's business.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from xpcsfit.boxqp import projected_gradient, solve_box_qp
from xpcsfit.engine.sums import Evaluator, NormalEquations


@dataclass(frozen=True)
class TrustRegionOptions:
    """Tolerances and tuning of :class:`TrustRegionLM`: the one place of their defaults
    (``xpcsfit.config.SolverOptions`` takes the user-settable ones from here).

    Attributes
    ----------
    ftol, xtol, gtol : float
        Convergence tolerances (see the module docstring).
    qtol : float
        With ``quantities``: the change of a determined quantity (in its standard
        errors) and the χ² reduction (in noise units) of a settled step.
    settle_steps : int
        Settled steps in a row that end the fit (see the module docstring).
    max_iterations : int
    trial_factors : tuple of float
        Damping multipliers tried together in one cost pass.
    accept_ratio : float
        Minimum actual/predicted reduction to accept a step.
    initial_damping : float
        λ relative to the scaled diagonal (which is 1 at the start).
    max_damping : float
        Give up (not converged) when no step is accepted below this λ.
    """

    ftol: float = 1e-8
    xtol: float = 1e-10
    gtol: float = 1e-8
    max_iterations: int = 200
    trial_factors: tuple[float, ...] = (1.0, 8.0, 64.0, 512.0)
    accept_ratio: float = 1e-4
    initial_damping: float = 1e-3
    max_damping: float = 1e16
    qtol: float = 0.05
    settle_steps: int = 3


class Termination(enum.Enum):
    """Why the solver stopped. The value is what a saved state records."""

    FTOL = "ftol"
    XTOL = "xtol"
    GTOL = "gtol"
    DETERMINED = "determined"
    NO_REDUCTION = "no_reduction"
    MAX_ITERATIONS = "max_iterations"
    DAMPING_LIMIT = "damping_limit"

    @property
    def converged(self) -> bool:
        """True for the convergence tests, False for the limits."""
        return self not in (Termination.MAX_ITERATIONS, Termination.DAMPING_LIMIT)

    def message(self, options: TrustRegionOptions) -> str:
        """The one-line reason, with the tolerance or limit that applied."""
        return _MESSAGES[self].format(o=options)


_MESSAGES = {
    Termination.FTOL: "relative cost reduction below ftol={o.ftol:g}",
    Termination.XTOL: "scaled step below xtol={o.xtol:g}",
    Termination.GTOL: "gradient below gtol={o.gtol:g}",
    Termination.DETERMINED: ("{o.settle_steps} steps in a row changed what the data determine by less than "
                             "qtol={o.qtol:g} of its standard errors and chi2 by less than qtol in noise units"),
    # Even the largest predicted gain is below rounding of the cost: a stationary point
    # to machine precision.
    Termination.NO_REDUCTION: "no reduction possible within floating-point precision",
    Termination.MAX_ITERATIONS: "reached max_iterations={o.max_iterations} (not converged)",
    Termination.DAMPING_LIMIT: ("no trial step reduced the cost even at damping {o.max_damping:.0e}; "
                                "the gradient is not small (not converged)"),
}


def finite_normal_equations(ne: NormalEquations) -> bool:
    """Whether cost, JᵀJ and Jᵀr are all finite (the solver cannot use them otherwise)."""
    return bool(np.isfinite(ne.cost) and np.all(np.isfinite(ne.jtj)) and np.all(np.isfinite(ne.jtr)))


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
    """Everything the solver carries between iterations (also its checkpoint).

    ``termination`` is None while the solver runs; ``done`` and ``converged`` follow
    from it.
    """

    x: np.ndarray
    ne: NormalEquations
    scale: np.ndarray
    damping: float
    iteration: int = 0
    normal_passes: int = 1
    cost_passes: int = 0
    termination: Termination | None = None
    settled_steps: int = 0  # settled steps in a row (see the module docstring)

    @property
    def passes(self) -> int:
        return self.normal_passes + self.cost_passes

    @property
    def done(self) -> bool:
        return self.termination is not None

    @property
    def converged(self) -> bool:
        return self.termination is not None and self.termination.converged

    def saved(self) -> dict:
        """What :meth:`TrustRegionLM.restore` needs, as JSON-ready numbers: ``x`` and
        ``scale`` (lists of P floats), ``damping``, ``cost`` (at x, for a consistency
        check), ``iteration``, ``normal_passes``, ``cost_passes``, ``settled_steps`` and ``termination`` (a
        :class:`Termination` value, None while running). Floats survive a JSON round trip
        exactly (Python writes the shortest repr that reads back to the same double)."""
        return {
            "x": [float(v) for v in self.x],
            "scale": [float(v) for v in self.scale],
            "damping": float(self.damping),
            "cost": float(self.ne.cost),
            "iteration": int(self.iteration),
            "normal_passes": int(self.normal_passes),
            "cost_passes": int(self.cost_passes),
            "settled_steps": int(self.settled_steps),
            "termination": None if self.termination is None else self.termination.value,
        }


@dataclass(frozen=True)
class _Trial:
    """The outcome of a step's trial passes: the accepted step, or why none was."""

    cost_passes: int
    damping: float
    x: np.ndarray | None = None
    step: np.ndarray | None = None  # scaled
    rho: float = float("nan")
    actual: float = float("nan")
    predicted: float = float("nan")
    termination: Termination | None = None
    tried: float = float("nan")  # the base damping of the accepted trial pass


class TrustRegionLM:
    """Bounded Levenberg–Marquardt with multi-damping trial passes.

    Parameters
    ----------
    lower, upper : ndarray (P,)
        Bounds; ±inf allowed. x0 must lie inside.
    callback : callable(IterationReport), optional
        Called after every iteration (progress output).
    quantities : callable(x (P,)) -> (values (k,), jacobian (k, P)), optional
        Quantities the data determine and their derivatives (see the module docstring);
        None: MINPACK's tests alone.
    **options
        Fields of :class:`TrustRegionOptions` (ftol, xtol, gtol, max_iterations, …);
        the others keep their defaults.

    Raises
    ------
    ValueError
        If the bounds are inverted.
    TypeError
        For an option :class:`TrustRegionOptions` does not have.
    """

    def __init__(self, lower, upper, *, callback: Callable[[IterationReport], None] | None = None,
                 quantities: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                 **options):
        self.lower = np.asarray(lower, float)
        self.upper = np.asarray(upper, float)
        if np.any(self.lower >= self.upper):
            raise ValueError("every lower bound must be below its upper bound")
        self.options = TrustRegionOptions(**options)
        self.trial_factors = np.asarray(self.options.trial_factors, float)
        self.callback = callback
        self.quantities = quantities

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
        state = SolverState(x=x0, ne=ne, scale=scale, damping=self.options.initial_damping)
        return replace(state, termination=self._gradient_test(state))

    def step(self, evaluator: Evaluator, state: SolverState) -> SolverState:
        """One iteration from a state that is not done: trial passes until a step is
        accepted (then one normal-equations pass) or the solver gives up. The new
        state's ``termination`` is set when a convergence test or a limit ends the fit."""
        while True:
            trial = self._search(evaluator, state)
            if trial.termination is not None:
                return replace(state, cost_passes=trial.cost_passes, damping=trial.damping,
                               termination=trial.termination)
            new_ne = evaluator.normal_equations(trial.x)
            if finite_normal_equations(new_ne):
                break
            # The cost was finite but its derivatives are not (overflow in the Jacobian):
            # a rejected step, paid for with its pass; retry in a smaller trust region.
            state = replace(state, normal_passes=state.normal_passes + 1, cost_passes=trial.cost_passes,
                            damping=self._rejected_damping(trial.tried))
            if state.damping > self.options.max_damping:
                return replace(state, termination=Termination.DAMPING_LIMIT)
        new = replace(
            state, x=trial.x, ne=new_ne, scale=self._scale(state.scale, new_ne),
            damping=max(trial.damping, 1e-15), iteration=state.iteration + 1,
            normal_passes=state.normal_passes + 1, cost_passes=trial.cost_passes,
        )
        if self.callback is not None:
            self.callback(IterationReport(
                iteration=new.iteration, cost=float(new_ne.cost),
                step_norm=float(np.linalg.norm(trial.step)), damping=float(trial.damping),
                rho=float(trial.rho), passes=new.passes,
            ))
        if self.quantities is not None:
            settled = self.settled(state, new, trial.actual)
            ok = settled["step"] <= self.options.qtol and settled["chi2"] <= self.options.qtol
            new = replace(new, settled_steps=new.settled_steps + 1 if ok else 0)
        return replace(new, termination=self._convergence_test(state, new, trial))

    def terminate(self, state: SolverState) -> tuple[bool, Termination | None]:
        """(done, why): whether ``state`` ends the solve, and its :class:`Termination`."""
        return state.done, state.termination

    def message(self, state: SolverState) -> str:
        """The termination message of ``state`` ("" while running)."""
        return "" if state.termination is None else state.termination.message(self.options)

    def solve(self, evaluator: Evaluator, x0) -> SolverState:
        """Run :meth:`init` then :meth:`step` until :meth:`terminate`; the final state."""
        state = self.init(evaluator, x0)
        while not self.terminate(state)[0]:
            state = self.step(evaluator, state)
        return state

    def restore(self, evaluator: Evaluator, saved: dict) -> SolverState:
        """Rebuild a state from :meth:`SolverState.saved` (e.g. read back from JSON) with
        one normal-equations pass at the saved x; the scale, damping, counters and
        termination are taken as saved, so :meth:`step` continues the saved trajectory.
        ``normal_passes`` counts the restoring pass on top of the saved ones.

        Raises
        ------
        ValueError
            If ``saved`` lacks a field, has the wrong number of parameters, holds a
            non-finite or non-positive scale or damping, a cost that is not a number,
            an unknown termination, or an x outside the bounds; nothing is evaluated then.
        """
        fields = self._check_saved(saved)
        ne = evaluator.normal_equations(fields["x"])
        return SolverState(ne=ne, **fields | {"normal_passes": fields["normal_passes"] + 1})

    # -- one step, piece by piece ------------------------------------------------------
    def _search(self, evaluator: Evaluator, state: SolverState) -> _Trial:
        """Trial passes from ``state``, raising the damping, until a step is accepted or
        none can be (a :class:`_Trial` with a termination)."""
        ne = state.ne
        scaled = self._scaled_problem(state)
        damping = state.damping
        cost_passes = state.cost_passes
        while True:
            dampings, steps, preds, trials = self._trial_points(state, scaled, damping)
            valid = np.isfinite(preds)
            costs = np.full(len(steps), np.inf)
            if valid.any():  # a pass only for the trials that could be computed
                costs[valid] = np.asarray(evaluator.costs(trials[valid]), float)
                cost_passes += 1
            actual = ne.cost - costs
            with np.errstate(divide="ignore", invalid="ignore"):
                rho = np.where(preds > 0, actual / preds, -np.inf)
            k = self._accept(costs, rho)
            if k is not None:
                return _Trial(cost_passes=cost_passes, damping=self._next_damping(dampings[k], rho[k]),
                              x=trials[k], step=steps[k], rho=rho[k], actual=actual[k], predicted=preds[k],
                              tried=damping)
            if valid.any() and np.max(preds[valid]) <= 16 * np.finfo(float).eps * ne.cost:
                return _Trial(cost_passes=cost_passes, damping=state.damping,
                              termination=Termination.NO_REDUCTION)
            damping = self._rejected_damping(damping)
            if damping > self.options.max_damping:
                return _Trial(cost_passes=cost_passes, damping=damping, termination=Termination.DAMPING_LIMIT)

    def _rejected_damping(self, damping: float) -> float:
        """The base damping after a pass in which no trial was accepted: beyond the
        largest one tried."""
        return damping * self.trial_factors[-1] * 8.0

    def _scaled_problem(self, state: SolverState):
        """(H̃, g̃, lower, upper) of the subproblem in Moré-scaled steps s = D·Δx."""
        x, ne, D = state.x, state.ne, state.scale
        return ne.jtj / np.outer(D, D), ne.jtr / D, (self.lower - x) * D, (self.upper - x) * D

    def _trial_points(self, state: SolverState, scaled, damping: float):
        """For the dampings λ·f (f in ``trial_factors``): the dampings (m,), the scaled
        steps, their predicted reductions (m,) and the trial points (m, P)."""
        Hs, gs, lo_s, hi_s = scaled
        dampings = damping * self.trial_factors
        steps = [self._subproblem(Hs + lam * np.eye(gs.size), gs, lo_s, hi_s) for lam in dampings]
        # A step that could not be computed has predicted reduction NaN: never accepted.
        preds = np.array([-(gs @ s + 0.5 * s @ Hs @ s) for s in steps])
        with np.errstate(invalid="ignore"):
            trials = np.clip(state.x + np.array(steps) / state.scale, self.lower, self.upper)
        return dampings, steps, preds, trials

    @staticmethod
    def _subproblem(H, g, lower, upper) -> np.ndarray:
        """The box-QP step, or NaNs where it cannot be computed (a factorisation that
        fails, or a non-finite step)."""
        try:
            s = solve_box_qp(H, g, lower, upper)
        except np.linalg.LinAlgError:
            return np.full(g.size, np.nan)
        return s if np.all(np.isfinite(s)) else np.full(g.size, np.nan)

    def _accept(self, costs, rho) -> int | None:
        """Index of the accepted trial: the cheapest whose ratio ρ of actual to predicted
        reduction exceeds ``accept_ratio`` (and whose cost is finite); None if none."""
        ok = (rho > self.options.accept_ratio) & np.isfinite(costs)
        if not ok.any():
            return None
        return int(np.flatnonzero(ok)[np.argmin(costs[ok])])

    @staticmethod
    def _next_damping(damping: float, rho: float) -> float:
        """Shrink λ after a step the model predicted well (ρ > 0.75), grow it after a
        poor one (ρ < 0.25)."""
        if rho > 0.75:
            return damping / 3.0
        if rho < 0.25:
            return damping * 2.0
        return damping

    def _convergence_test(self, old: SolverState, new: SolverState, trial: _Trial) -> Termination | None:
        """MINPACK's tests after an accepted step, then DETERMINED (with ``quantities``),
        then the iteration limit."""
        o = self.options
        if trial.actual <= o.ftol * old.ne.cost and trial.predicted <= o.ftol * old.ne.cost:
            return Termination.FTOL
        if np.linalg.norm(trial.step) <= o.xtol * (o.xtol + np.linalg.norm(old.scale * new.x)):
            return Termination.XTOL
        gradient = self._gradient_test(new)
        if gradient is not None:
            return gradient
        if self.quantities is not None and new.settled_steps >= o.settle_steps:
            return Termination.DETERMINED
        if new.iteration >= o.max_iterations:
            return Termination.MAX_ITERATIONS
        return None

    def settled(self, old: SolverState, new: SolverState, reduction: float) -> dict:
        """How far the step from ``old`` to ``new`` (which reduced the cost by
        ``reduction``) moved what the data determine: ``step``, the largest change of a
        quantity in its standard errors at ``new``; ``chi2``, the χ² reduction in noise
        units; ``stderr`` (k,). Infinite where the covariance cannot be computed (nothing
        is settled then). See the module docstring."""
        values, G = (np.asarray(a, float) for a in self.quantities(new.x))
        ne = new.ne
        dof = ne.n - new.x.size
        unsettled = {"step": np.inf, "chi2": np.inf, "stderr": np.full(values.shape, np.nan)}
        if dof <= 0 or not ne.cost > 0:
            return unsettled
        D = new.scale
        try:
            w, V = np.linalg.eigh(ne.jtj / np.outer(D, D))
        except np.linalg.LinAlgError:
            return unsettled
        w = np.maximum(w, 1e-15 * max(float(w.max()), np.finfo(float).tiny))
        sigma2 = 2.0 * ne.cost / dof
        GV = (G / D) @ V  # the quantities' gradients in the scaled eigenbasis
        stderr = np.sqrt(sigma2 * np.sum(GV**2 / w, axis=1))
        change = np.abs(values - np.asarray(self.quantities(old.x)[0], float))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(stderr > 0, change / stderr, np.where(change > 0, np.inf, 0.0))
        return {"step": float(np.max(ratio, initial=0.0)), "chi2": float(2.0 * reduction / sigma2), "stderr": stderr}

    def _gradient_test(self, state: SolverState) -> Termination | None:
        """GTOL when the largest cosine between a Jacobian column and the residual
        vector (projected gradient at active bounds) is at most ``gtol``."""
        ne = state.ne
        g = projected_gradient(ne.jtr, state.x, self.lower, self.upper)
        column_norm = np.sqrt(np.maximum(np.diag(ne.jtj), 0.0))
        residual_norm = np.sqrt(2.0 * ne.cost)
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = np.where(column_norm > 0, np.abs(g) / (column_norm * residual_norm), 0.0)
        if residual_norm == 0 or float(np.max(cosine, initial=0.0)) <= self.options.gtol:
            return Termination.GTOL
        return None

    @staticmethod
    def _scale(previous: np.ndarray, ne: NormalEquations) -> np.ndarray:
        diag = np.sqrt(np.maximum(np.diag(ne.jtj), 0.0))
        scale = np.maximum(previous, diag)
        # A column that has been exactly zero so far carries no information to scale by.
        return np.where(scale > 0, scale, 1.0)

    def _check_saved(self, saved: dict) -> dict:
        """The SolverState fields (but ne) of a saved mapping, validated (see restore)."""
        P = self.lower.size
        try:
            x = np.asarray(saved["x"], dtype=float)
            scale = np.asarray(saved["scale"], dtype=float)
            damping = float(saved["damping"])
            float(saved["cost"])  # checked by the caller against the recomputed cost
            counters = [saved[k] for k in ("iteration", "normal_passes", "cost_passes", "settled_steps")]
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
            raise ValueError(f"iteration, pass and settled-step counters must be integers >= 0, got {counters}")
        if termination is not None and termination not in {t.value for t in Termination}:
            raise ValueError(f"termination {termination!r}: not null nor one of "
                             f"{', '.join(t.value for t in Termination)}")
        if np.any(x < self.lower) or np.any(x > self.upper):
            raise ValueError("x lies outside the bounds")
        iteration, normal_passes, cost_passes, settled_steps = counters
        return dict(x=x, scale=scale, damping=damping, iteration=iteration, normal_passes=normal_passes,
                    cost_passes=cost_passes, settled_steps=settled_steps, termination=None if termination is None else Termination(termination))
