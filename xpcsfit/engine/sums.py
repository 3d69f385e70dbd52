"""What a pass over the data returns: the seam between the solver and the evaluators.

- :class:`NormalEquations` — JᵀJ, Jᵀr, cost and n at one x: all the solver sees
  (DESIGN.md §5).
- :class:`Evaluator` — the protocol the solver calls: ``normal_equations(x)`` and
  ``costs(xs)``.
- :class:`BlockSums` — the block-arrow form of the normal equations that the tile
  kernel returns and the evaluators add up; :meth:`BlockSums.normal_equations`
  assembles the dense (P, P) form the solver takes.

The solver imports only this module from the engine: it knows nothing of tiles or Dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class NormalEquations:
    """JᵀJ (P, P), Jᵀr (P,), cost = ½ Σ r² and the number of residuals n at one x."""

    jtj: np.ndarray
    jtr: np.ndarray
    cost: float
    n: int


class Evaluator(Protocol):
    """What the solver needs from a least-squares problem.

    ``normal_equations(x)`` at one x (P,); ``costs(xs)`` (m,) at each row of xs (m, P),
    cost = ½ Σ r². Nothing else: no residuals, data or cluster.
    """

    def normal_equations(self, x: np.ndarray) -> NormalEquations: ...

    def costs(self, xs: np.ndarray) -> np.ndarray: ...


@dataclass
class BlockSums:
    """Reduced block-arrow normal equations of a set of tiles (see ``engine/kernel.py``).

    Attributes
    ----------
    A : (p, p)        B : (n_bins, p, 2)      C : (n_bins, 2, 2)
    g_theta : (p,)    g_bin : (n_bins, 2)
    rss : (n_bins,)   Σ r² per bin (C[:, 1, 1] is the bin's number of points)
    n : int           number of points
    """

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    g_theta: np.ndarray
    g_bin: np.ndarray
    rss: np.ndarray
    n: int

    @property
    def cost(self) -> float:
        """½ Σ r² over all bins."""
        return 0.5 * float(self.rss.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays and the count (what a pass sends back per part)."""
        return sum(np.asarray(v).nbytes for v in (self.A, self.B, self.C, self.g_theta, self.g_bin,
                                                   self.rss)) + 8

    def residual_rms(self) -> np.ndarray:
        """Root mean square residual per bin, (n_bins,); NaN for a bin without points."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.rss / self.C[:, 1, 1])

    def __add__(self, other: "BlockSums") -> "BlockSums":
        return BlockSums(
            self.A + other.A,
            self.B + other.B,
            self.C + other.C,
            self.g_theta + other.g_theta,
            self.g_bin + other.g_bin,
            self.rss + other.rss,
            self.n + other.n,
        )

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """Assemble JᵀJ (P, P) and Jᵀr (P,) over x = [θ, contrast_0.., offset_0..].

        P = p + 2·n_bins. The layout matches :class:`~xpcsfit.parameters.ParameterLayout`.
        """
        p = self.A.shape[0]
        nb = self.C.shape[0]
        P = p + 2 * nb
        jtj = np.zeros((P, P))
        jtj[:p, :p] = self.A
        ic = p + np.arange(nb)
        io = p + nb + np.arange(nb)
        jtj[:p, ic] = self.B[:, :, 0].T
        jtj[:p, io] = self.B[:, :, 1].T
        jtj[ic, :p] = self.B[:, :, 0]
        jtj[io, :p] = self.B[:, :, 1]
        jtj[ic, ic] = self.C[:, 0, 0]
        jtj[ic, io] = self.C[:, 0, 1]
        jtj[io, ic] = self.C[:, 1, 0]
        jtj[io, io] = self.C[:, 1, 1]
        jtr = np.concatenate([self.g_theta, self.g_bin[:, 0], self.g_bin[:, 1]])
        return jtj, jtr

    def normal_equations(self) -> NormalEquations:
        """The dense :class:`NormalEquations` (what the solver takes)."""
        jtj, jtr = self.dense()
        return NormalEquations(jtj=jtj, jtr=jtr, cost=float(self.cost), n=int(self.n))
