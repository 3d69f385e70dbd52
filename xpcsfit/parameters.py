"""Parameter names, units, default bounds and starting values of the two modes.

Names and default bounds follow homodyne (DESIGN.md §2) so that users can compare
results. Contrast and offset belong to each (q, phi) bin and enter the model linearly.
"""

from __future__ import annotations

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

# Starting values where the data give no estimate (see _initial.py for those that do).
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
