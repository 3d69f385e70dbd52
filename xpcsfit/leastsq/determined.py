"""What the data determine: the quantities the solver judges convergence by, and the
parameters that drift while those stay put.

A two-time map constrains the model through ∫J dt and ∫gamma_dot dt between its frame
times, the flow angle phi0 and each bin's contrast and offset (DESIGN.md §2): c2 is a
function of J(t) and gamma_dot(t) over the measured window, not of the seven power-law
parameters separately. Where alpha ≈ 0, D0 and D_offset trade off along a valley of
near-equal cost (D0·t**alpha + D_offset ≈ D0 + D_offset + D0·alpha·ln t), and a
solver that waits for every parameter to settle crawls along it. So the fit hands the
solver (:class:`xpcsfit.solver.TrustRegionLM`, ``quantities``) these quantities with
their derivatives, and reports which physics parameters still moved when they settled.
"""

from __future__ import annotations

import numpy as np

from xpcsfit.model import power_law_gradient, shear_rate, transport_coefficient
from xpcsfit.parameters import ParameterLayout

N_TIMES = 16  # J(t), gamma_dot(t) sampled at 16 times across the window: smooth power laws
DRIFT_LIMIT = 1e-3


def window_times(t_first: float, t_last: float, n: int = N_TIMES) -> np.ndarray:
    """n evenly spaced times (s) over the measured window [t_first, t_last]."""
    return np.linspace(float(t_first), float(t_last), n)


def determined_quantities(layout: ParameterLayout, mode: str, times):
    """The map x (P,) ↦ (values (k,), jacobian (k, P)) of what the data determine.

    Quantities, in order: J(t) at ``times`` (Å²/s), in laminar_flow gamma_dot(t) at
    ``times`` (1/s) and phi0 (deg), then every bin's contrast and offset;
    k = n_t (+ n_t + 1) + 2·n_bins. J and gamma_dot are
    :func:`~xpcsfit.model.transport_coefficient` and :func:`~xpcsfit.model.shear_rate`,
    their derivatives :func:`~xpcsfit.model.power_law_gradient`.

    Parameters
    ----------
    layout : ParameterLayout
    mode : {"static", "laminar_flow"}
    times : ndarray (n_t,)
        s, > 0: the measured window (:func:`window_times`).
    """
    t = np.asarray(times, float)
    p, P = layout.p, layout.size
    flow = mode == "laminar_flow"

    def quantities(x):
        theta = np.asarray(x[:p], float)
        rows = [transport_coefficient(theta, t)]
        jac = [np.zeros((t.size, P))]
        jac[0][:, 0:3] = power_law_gradient(theta[0], theta[1], t)
        if flow:
            rows += [shear_rate(theta, t), theta[6:7]]
            shear = np.zeros((t.size, P))
            shear[:, 3:6] = power_law_gradient(theta[3], theta[4], t)
            angle = np.zeros((1, P))
            angle[0, 6] = 1.0
            jac += [shear, angle]
        rows.append(np.asarray(x[p:], float))
        jac.append(np.eye(P)[p:])
        return np.concatenate(rows), np.concatenate(jac)

    return quantities


class DriftLog:
    """The physics parameters over the final run of *settled* solver steps (those that
    no longer changed what the data determine, :class:`xpcsfit.solver.SolverState`
    ``settled_steps``), to say which parameters still moved while those stood still.

    Parameters
    ----------
    names : sequence of str
        Physics parameter names (the first len(names) entries of x).
    lower, upper : ndarray (≥ p,)
        Bounds: a parameter near 0 is judged relative to 1e-3 of its bound width.
    """

    def __init__(self, names, lower, upper):
        self.names = list(names)
        p = len(self.names)
        self.floor = 1e-3 * (np.asarray(upper, float)[:p] - np.asarray(lower, float)[:p])
        self.history: list = []

    def add(self, x, settled_steps: int) -> None:
        """Log a state: its x and its count of settled steps in a row (0 starts the run
        afresh at this state)."""
        if settled_steps == 0:
            self.history = []
        self.history.append(np.array(x[: len(self.names)], float))

    def drifted(self) -> dict[str, float]:
        """{name: relative change} of the parameters that moved by more than
        :data:`DRIFT_LIMIT` of max(|value|, 1e-3·bound width) over the settled run."""
        if len(self.history) < 2:
            return {}
        first, last = self.history[0], self.history[-1]
        rel = np.abs(last - first) / np.maximum(np.abs(last), self.floor)
        return {n: float(r) for n, r in zip(self.names, rel) if r > DRIFT_LIMIT}

    @property
    def iterations(self) -> int:
        """Over how many iterations :meth:`drifted` measures."""
        return max(len(self.history) - 1, 0)


def undetermined_record(drift: dict[str, float], iterations: int, converged: bool) -> tuple[dict | None, list[str]]:
    """fit.json's ``undetermined`` and its warning, for a fit that ended converged while
    the parameters in ``drift`` ({name: relative change over ``iterations``}, from
    :meth:`DriftLog.drifted`) still moved; (None, []) otherwise."""
    if not (converged and drift):
        return None, []
    n = iterations
    names_in_order = list(drift)
    record = {"parameters": names_in_order, "relative_drift": drift, "iterations": n}
    names = ", ".join(names_in_order)
    moved = ", ".join(f"{k} {v:.2%}" for k, v in drift.items())
    return record, [f"{names} still drifted over the last {n} iterations ({moved}) while J(t), gamma_dot(t), "
                    "phi0, contrast and offset no longer changed: the data do not determine "
                    f"{'it' if len(drift) == 1 else 'them'} separately; report J(t) and gamma_dot(t)"]
