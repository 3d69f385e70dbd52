"""Fit configuration: a YAML file validated by pydantic, merged with keywords.

Example ``fit.yaml``::

    mode: laminar_flow
    gap: 2.0e6              # Å
    tile: 128               # frames per time tile (default: a store's chunk side, else 128)
    memory: auto            # hold tiles on the workers, stream them each pass, or choose
    initial: {D0: 15000, phi0: 5}
    bounds: {D0: [100, 1.0e6], phi0: [-20, 20]}
    solver: {max_iterations: 200, ftol: 1.0e-8}

Keyword arguments of :func:`xpcsfit.fit` (and CLI options) override the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xpcsfit.errors import ConfigError
from xpcsfit.parameters import DEFAULT_BOUNDS, MODES, PER_BIN
from xpcsfit.solver import TrustRegionOptions

_SOLVER_DEFAULTS = TrustRegionOptions()


class SolverOptions(BaseModel):
    """The tolerances of the trust-region solver a config may set; defaults from
    :class:`xpcsfit.solver.TrustRegionOptions` (the one place they are written)."""

    model_config = ConfigDict(extra="forbid")
    max_iterations: int = Field(_SOLVER_DEFAULTS.max_iterations, gt=0)
    ftol: float = Field(_SOLVER_DEFAULTS.ftol, gt=0, lt=1)
    xtol: float = Field(_SOLVER_DEFAULTS.xtol, gt=0, lt=1)
    gtol: float = Field(_SOLVER_DEFAULTS.gtol, gt=0, lt=1)


class FitConfig(BaseModel):
    """Validated fit settings. Unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["static", "laminar_flow"] = "laminar_flow"
    gap: float | None = Field(None, gt=0, description="gap L, Å")
    tile: int | None = Field(None, ge=8, le=4096, description="frames per tile; default: a store's chunk, else 128")
    memory: Literal["auto", "hold", "stream"] = "auto"
    initial: dict[str, float] = {}
    bounds: dict[str, tuple[float, float]] = {}
    solver: SolverOptions = SolverOptions()

    @field_validator("gap")
    @classmethod
    def _finite_gap(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @model_validator(mode="after")
    def _check_parameters(self):
        allowed = set(MODES[self.mode]) | set(PER_BIN)
        for section in ("initial", "bounds"):
            for name in getattr(self, section):
                if name not in allowed:
                    raise ValueError(
                        f"{section}.{name}: not a parameter of mode {self.mode} "
                        f"(parameters: {', '.join(sorted(allowed))})"
                    )
        for name, (lo, hi) in self.bounds.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"bounds.{name}: need finite lower < upper, got [{lo}, {hi}]")
        for name, value in self.initial.items():
            lo, hi = self.bound(name)
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"initial.{name}={value} lies outside its bounds [{lo}, {hi}]")
        return self

    def bound(self, name: str) -> tuple[float, float]:
        """(lower, upper) of a parameter: the config's, else homodyne's default."""
        return tuple(self.bounds.get(name, DEFAULT_BOUNDS[name]))


def load_config(source=None, **overrides) -> FitConfig:
    """Read and validate a configuration.

    Parameters
    ----------
    source : None, str, Path, dict or FitConfig
        A YAML file, a mapping with the same keys, or a ready FitConfig.
    **overrides
        Keys set by the caller (CLI options, keywords); ``None`` values are ignored.

    Raises
    ------
    ConfigError
        Unreadable file, bad YAML, unknown key or out-of-range value; the message
        names the file and the key.
    """
    where = "config"
    if source is None:
        data = {}
    elif isinstance(source, FitConfig):
        data = source.model_dump()
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return FitConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {loc}: {msg}") from None
