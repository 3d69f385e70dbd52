"""The subproblem of the trust-region solver: a convex quadratic over a box.

:func:`solve_box_qp` minimises ½ sᵀHs + gᵀs subject to lower ≤ s ≤ upper by a primal
active-set method (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 16.3,
specialised to bound constraints); :func:`projected_gradient` is the gradient that the
box lets act. NumPy only, on the p×p scaled normal equations.
"""

from __future__ import annotations

import numpy as np


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


def projected_gradient(g, x, lower, upper):
    """Zero the gradient components that push against an active bound."""
    at_lower = (x <= lower) & (g > 0)
    at_upper = (x >= upper) & (g < 0)
    return np.where(at_lower | at_upper, 0.0, g)
