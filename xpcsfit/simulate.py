"""``xpcsfit simulate``: an APS-U-layout result file from the model plus noise.

The file has the keys and conventions of a boost_corr result (DESIGN.md §3): upper-
triangular float32 maps, processed_bins, the q × phi grid and frame_time. Beside it,
``<name>.truth.json`` records every parameter used, so fits can be checked.

Two kinds of noise:

- default: Gaussian, independent per element, with standard deviation ``noise`` (the
  simple, known case). Maps are generated in row bands so 23 × 8000² datasets never sit
  in memory.
- ``speckle=True``: moving particles, far-field speckle with Poisson counts and a
  correlator's c2 (:mod:`xpcsfit.speckle`): noise as real correlator output has it,
  correlated over a decorrelation time and different per bin. Each bin's frames
  (T × pixels counts) are held while its map is written band by band.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xpcsfit import __version__
from xpcsfit.errors import ConfigError
from xpcsfit.io.apsu import write_aps_u
from xpcsfit.io.atomic import atomic_write_text
from xpcsfit.model import c2_model, enable_float64
from xpcsfit.parameters import DEFAULT_GAP, MODES
from xpcsfit.speckle import correlate, speckle_intensities

TRUTH = {
    "D0": 2.0e4,
    "alpha": 0.0,
    "D_offset": 0.0,
    "gamma_dot_t0": 2.0e-4,
    "beta": 0.0,
    "gamma_dot_t_offset": 0.0,
    "phi0": 6.0,
}

# t = 0 (frame 0) is evaluated this close to 0, in units of dt: ∫ t**alpha dt from 0
# is finite for alpha > -1 but the log form needs t > 0.
_T0_FRACTION = 1e-9

# Root attribute that marks a file written here: only such a file is ever replaced.
SIMULATED_ATTR = "xpcsfit_simulated"

_TRUTH_UNITS = {"q": "1/Å", "L": "Å", "dt": "s", "D0": "Å²/s^(1+alpha)", "D_offset": "Å²/s",
                "gamma_dot_t0": "1/s^(1+beta)", "gamma_dot_t_offset": "1/s", "phi0": "deg"}


def phi_grid(n_phi: int) -> np.ndarray:
    """n_phi bin centres evenly spread over [0, 180) degrees (symmetry fold 2)."""
    return (np.arange(n_phi) + 0.5) * 180.0 / n_phi


def truth_path(path: Path) -> Path:
    """Where the truth JSON of a simulated file lives: ``<stem>.truth.json`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".truth.json")


def refuse_foreign(out: Path) -> None:
    """Refuse to replace ``out`` or its truth JSON unless ``xpcsfit simulate`` wrote them.

    Raises
    ------
    ConfigError
        ``out`` exists and is not a file simulated by xpcsfit (no :data:`SIMULATED_ATTR`
        on its root group), or its truth JSON exists while ``out`` does not.
    """
    import h5py

    if out.exists() or out.is_symlink():
        try:
            with h5py.File(out, "r") as f:
                ours = SIMULATED_ATTR in f.attrs
        except OSError:
            ours = False
        if not ours:
            raise ConfigError(f"{out}: exists and was not written by xpcsfit simulate; "
                              "choose another file name")
    elif truth_path(out).exists():
        raise ConfigError(f"{truth_path(out)}: exists without its simulated file; "
                          "choose another file name")


def simulate(out, *, mode: str = "laminar_flow", q=(0.0055,), n_phi: int = 8, n_frames: int = 500,
             dt: float = 0.1, gap: float = DEFAULT_GAP, params: dict | None = None,
             contrast: float = 0.25, offset: float = 1.0, noise: float = 0.02, seed: int = 0,
             speckle: bool = False, pixels: int = 256, particles: int = 256, counts: float = 2.0) -> Path:
    """Write a simulated APS-U result file and its truth JSON.

    Parameters
    ----------
    out : str or Path
        HDF5 file to write, atomically; an existing file is replaced only if
        ``simulate`` wrote it (see :func:`refuse_foreign`).
    mode : {"laminar_flow", "static"}
    q : sequence of float
        q values, 1/Å (one map per q and phi).
    n_phi : int
        Number of phi bins, spread over [0, 180) degrees.
    n_frames : int
        Frames T; maps are T × T, frame k at t = k·dt.
    dt : float
        s.
    gap : float
        L, Å.
    params : dict, optional
        Physics parameters overriding :data:`TRUTH` (names of DESIGN.md §2).
    contrast, offset : float
        Same for every bin.
    noise : float
        Standard deviation of the Gaussian noise added to every element.
    seed : int
    speckle : bool
        Simulate the measurement instead (:mod:`xpcsfit.speckle`): particles, speckle,
        Poisson counts, a correlator's c2. ``contrast``, ``offset`` and ``noise`` are
        then not used: the contrast is 1/4·(1 − 1/particles), the offset 1, and the noise
        is what the counts give.
    pixels, particles : int
        Speckle mode: pixels per (q, phi) bin, scatterers per bin.
    counts : float
        Speckle mode: mean photons per pixel per frame.

    Returns
    -------
    Path of the HDF5 file.

    Raises
    ------
    ConfigError
        Unknown mode or parameter, or a non-positive size, dt, gap, pixels, particles
        or counts, or noise < 0.
    """
    enable_float64()
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    values = dict(TRUTH)
    for name, value in (params or {}).items():
        if name not in values:
            raise ConfigError(f"unknown parameter {name!r}")
        values[name] = float(value)
    if n_phi < 1 or n_frames < 3 or dt <= 0 or gap <= 0 or noise < 0 or not len(q):
        raise ConfigError("simulate needs n_phi >= 1, n_frames >= 3, dt > 0, gap > 0, noise >= 0 and a q")
    if speckle and (pixels < 1 or particles < 2 or not counts > 0):
        raise ConfigError("simulate --speckle needs pixels >= 1, particles >= 2 and counts > 0")
    theta = np.array([values[n] for n in MODES["laminar_flow"]])[: len(MODES[mode])]
    q = np.asarray(q, float)
    phis = phi_grid(n_phi)
    t = np.arange(n_frames) * dt
    t[0] = _T0_FRACTION * dt

    def band_of(iq, ip):
        def band(a, b):
            # Columns from the band's first row on: the writer keeps the upper triangle
            # only, so the model is never evaluated far below the diagonal, where its
            # integrals turn negative and exp overflows.
            model = np.asarray(c2_model(theta, np.array([contrast]), np.array([offset]), mode, q[iq],
                                        gap, phis[ip : ip + 1], t[a:b], t[a:])[0])
            rng = np.random.default_rng([seed, iq, ip, a])
            out = np.zeros((b - a, t.size))
            out[:, a:] = model + noise * rng.standard_normal(model.shape)
            return out

        return band

    def speckle_band_of(iq, ip):
        frames = speckle_intensities(np.random.default_rng([seed, iq, ip]), q[iq], phis[ip], theta, mode, t,
                                     gap, pixels=pixels, particles=particles, counts=counts)
        return lambda a, b: correlate(frames, a, b)

    out = Path(out)
    refuse_foreign(out)
    maker = speckle_band_of if speckle else band_of
    maps = {(iq, ip): maker(iq, ip) for iq in range(q.size) for ip in range(n_phi)}
    write_aps_u(out, q_grid=q, phi_grid=phis, maps=maps, frame_time=dt, n_frames=n_frames,
                attrs={SIMULATED_ATTR: __version__})
    truth = {"file": out.name, "mode": mode,
             "truth": {n: values[n] for n in MODES[mode]} | {"L": gap, "dt": dt, "n_frames": n_frames},
             "contrast": contrast, "offset": offset, "noise_sigma": noise, "q": q.tolist(),
             "phi": phis.tolist(), "seed": seed, "units": _TRUTH_UNITS}
    if speckle:
        truth.update(contrast=0.25 * (1.0 - 1.0 / particles), offset=1.0, noise_sigma=None,
                     speckle={"pixels": pixels, "particles": particles, "counts": counts})
    atomic_write_text(truth_path(out), json.dumps(truth, indent=1))
    return out
