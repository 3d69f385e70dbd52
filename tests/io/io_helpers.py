"""What the io tests share: the APS data beside the checkout, small maps."""

from __future__ import annotations

import h5py
import numpy as np

from data_paths import FLOW, STATIC  # noqa: F401  (re-exported for the io tests)

README_PHI = [11.4, 33.8, 56.3, 78.9, 101.3, 123.6, 146.1, 168.6]
MAPS = "/xpcs/twotime/correlation_map"


def h5_maps(path, names, a=1, b=499):
    """Frames a..b of the APS-U maps ``names`` of ``path``, stacked."""
    with h5py.File(path, "r") as f:
        return np.stack([f[f"{MAPS}/{n}"][a : b + 1, a : b + 1] for n in names])


def upper_mask(n):
    """(n, n) bool: True on and above the diagonal."""
    return np.triu(np.ones((n, n), dtype=bool))


def random_maps(cells, n, seed=0):
    """A random (n, n) float32 map in [1, 2) for each cell."""
    rng = np.random.default_rng(seed)
    return {cell: (1.0 + rng.random((n, n))).astype(np.float32) for cell in cells}
