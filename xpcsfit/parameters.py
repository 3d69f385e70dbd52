"""Parameter names, units, default bounds and starting values of the two modes; where
each parameter sits in the solver's vector (:class:`ParameterLayout`); the gap L.

Names and default bounds follow homodyne (DESIGN.md §2) so that users can compare
results. Contrast and offset belong to each (q, phi) bin and enter the model linearly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

MODES: dict[str, tuple[str, ...]] = {
    "static": ("D0", "alpha", "D_offset"),
    "laminar_flow": (
        "D0",
        "alpha",
        "D_offset",
        "gamma_dot_t0",
        "beta",
        "gamma_dot_t_offset",
        "phi0",
    ),
}

# The per-bin parameters, in the order of their blocks in x (see ParameterLayout).
PER_BIN: tuple[str, ...] = ("contrast", "offset")

UNITS: dict[str, str] = {
    "D0": "Å²/s^(1+alpha)",
    "alpha": "1",
    "D_offset": "Å²/s",
    "gamma_dot_t0": "1/s^(1+beta)",
    "beta": "1",
    "gamma_dot_t_offset": "1/s",
    "phi0": "deg",
    "contrast": "1",
    "offset": "1",
}

DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "contrast": (0.0, 1.0),
    "offset": (0.5, 1.5),
    "D0": (1e2, 1e5),
    "alpha": (-2.0, 2.0),
    "D_offset": (-1e5, 1e5),
    "gamma_dot_t0": (1e-6, 0.5),
    "beta": (-2.0, 2.0),
    "gamma_dot_t_offset": (-0.1, 0.1),
    "phi0": (-10.0, 10.0),
}

# Starting values where the data give no estimate (see leastsq/initial.py for those that do).
DEFAULT_INITIAL: dict[str, float] = {
    "D0": 1e4,
    "alpha": 0.0,
    "D_offset": 0.0,
    "gamma_dot_t0": 1e-4,
    "beta": 0.0,
    "gamma_dot_t_offset": 0.0,
    "phi0": 0.0,
}

# The gap L (Å) is not recorded in APS result files.
DEFAULT_GAP = 2.0e6


class GapWarning(UserWarning):
    """The gap L was not given and the default was used."""


def physics_names(mode: str) -> tuple[str, ...]:
    """Names of the physics parameters of ``mode``, in the order of θ.

    Raises
    ------
    ConfigError
        If ``mode`` is not one of :data:`MODES`.
    """
    from xpcsfit.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode]


def resolve_gap(cfg, ds, *, warn: bool = True, stacklevel: int = 2) -> tuple[float, bool]:
    """The gap L (Å) of a fit: the config's, else the dataset's, else :data:`DEFAULT_GAP`.

    Parameters
    ----------
    cfg : FitConfig
        Its ``gap`` (None when not given) and ``mode``.
    ds : xarray.Dataset
        From :func:`xpcsfit.open_dataset`; a store records the gap given at ingest in
        ``attrs["L"]``.
    warn : bool
        Warn at once when the default is used (see :func:`warn_default_gap`); False
        leaves the warning to the caller, who may want to raise other errors first.
    stacklevel : int
        Of the warning, as for :func:`warnings.warn` called where this is called
        (2: the warning names the line that called the caller).

    Returns
    -------
    (L, defaulted)
        L in Å, and whether it is :data:`DEFAULT_GAP` because nothing gave one.
    """
    L = cfg.gap if cfg.gap is not None else ds.attrs.get("L")
    if L is not None:
        return float(L), False
    if warn:
        warn_default_gap(cfg.mode, stacklevel=stacklevel + 1)
    return DEFAULT_GAP, True


def warn_default_gap(mode: str, stacklevel: int = 2) -> None:
    """Warn (:class:`GapWarning`) that :data:`DEFAULT_GAP` is used; only laminar_flow
    depends on the gap, so static fits are not warned. ``stacklevel`` as for
    :func:`resolve_gap`."""
    if mode == "laminar_flow":
        warnings.warn(default_gap_message(), GapWarning, stacklevel=stacklevel + 1)


def default_gap_message() -> str:
    """The text of the :class:`GapWarning`."""
    return f"gap L not given; using the default {DEFAULT_GAP:.1e} Å (the result files do not record it)"


@dataclass(frozen=True)
class ParameterLayout:
    """Where each parameter sits in the solver's vector x.

    x = [θ (p physics parameters), contrast of every bin, offset of every bin], bins
    ordered (q, phi) row-major: bin = q_position·n_phi + phi_position.
    """

    physics: tuple[str, ...]
    n_q: int
    n_phi: int

    @property
    def p(self) -> int:
        return len(self.physics)

    @property
    def n_bins(self) -> int:
        return self.n_q * self.n_phi

    @property
    def size(self) -> int:
        return self.p + 2 * self.n_bins

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(θ (p,), contrast (n_bins,), offset (n_bins,)) views of x (..., P)."""
        p, nb = self.p, self.n_bins
        return x[..., :p], x[..., p : p + nb], x[..., p + nb :]

    def join(self, theta, contrast, offset) -> np.ndarray:
        """x (P,) from θ (p,), contrast and offset (n_bins,) or (n_q, n_phi)."""
        return np.concatenate([np.asarray(theta, float), np.ravel(contrast), np.ravel(offset)])

    def names(self) -> list[str]:
        """The P names of x: the physics names, then ``contrast[b]``, ``offset[b]``."""
        return list(self.physics) + [f"{name}[{b}]" for name in PER_BIN for b in range(self.n_bins)]
