"""Small input trees for the batch tests: simulated APS-U files, a legacy file, and
files that are not (valid) two-time results."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from xpcsfit.io.legacy import write_legacy
from xpcsfit.simulate import simulate


def apsu_file(path: Path, *, q=(0.0055,), n_frames: int = 24, seed: int = 0) -> Path:
    """A small simulated APS-U file: len(q) q × 2 phi × n_frames frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return simulate(path, q=q, n_phi=2, n_frames=n_frames, noise=0.01, seed=seed)


def legacy_file(path: Path, n_frames: int = 24) -> Path:
    """A small legacy-layout file: 1 q × 2 phi, constant maps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    maps = {(0, 0): np.full((n_frames, n_frames), 1.1, np.float32),
            (0, 1): np.full((n_frames, n_frames), 1.2, np.float32)}
    return write_legacy(path, q_grid=[0.005], phi_grid=[0.0, 90.0], maps=maps, exposure_period=0.1)


def not_hdf5(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a result\n")
    return path


def hdf5_without_maps(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["entry/x"] = np.arange(3)
    return path


def corrupt_apsu(path: Path) -> Path:
    """An APS-U file whose processed_bins key is gone: a damaged result."""
    apsu_file(path)
    with h5py.File(path, "a") as f:
        del f["/xpcs/twotime/processed_bins"]
    return path
