"""Fit configuration: a YAML file validated by pydantic, merged with keywords.

Example ``fit.yaml``::

    mode: laminar_flow
    gap: 2.0e6              # Å
    tile: 128               # frames per time tile (default: a store's chunk side, else 128)
    memory: auto            # hold tiles on the workers, stream them each pass, or choose
    covariance: inflated    # errors for correlated noise (lag-autocorrelation inflation), or naive
    initial: {D0: 15000, phi0: 5}
    bounds: {D0: [100, 1.0e6], phi0: [-20, 20]}
    solver: {max_iterations: 200, ftol: 1.0e-8, qtol: 0.05}
    starts: 1               # > 1: that many fits from spread-out starts (leastsq/starts.py)
    starts_seed: 0

Keyword arguments of :func:`xpcsfit.fit` (and CLI options) override the file.

Numbers may be written as numeric strings ("1e6": PyYAML reads 1e6 without a dot as a
string); booleans, NaN and infinities are refused where a number is expected, as are
unknown keys, a key given twice, and parameters that the mode does not have.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from xpcsfit.errors import ConfigError
from xpcsfit.parameters import DEFAULT_BOUNDS, MODES, PER_BIN
from xpcsfit.solver import TrustRegionOptions

_SOLVER_DEFAULTS = TrustRegionOptions()


def _not_bool(value):
    # pydantic's lax mode reads true as 1: `gap: yes` would silently mean 1 Å
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


# Numbers may be given as numeric strings: YAML 1.1 (PyYAML) reads 1e6, without a dot,
# as the string "1e6". Booleans, NaN and infinities are refused.
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Count = Annotated[int, BeforeValidator(_not_bool)]


class SolverOptions(BaseModel):
    """The tolerances of the trust-region solver a config may set; defaults from
    :class:`xpcsfit.solver.TrustRegionOptions` (the one place they are written)."""

    model_config = ConfigDict(extra="forbid")
    max_iterations: Count = Field(_SOLVER_DEFAULTS.max_iterations, gt=0)
    ftol: Number = Field(_SOLVER_DEFAULTS.ftol, gt=0, lt=1)
    xtol: Number = Field(_SOLVER_DEFAULTS.xtol, gt=0, lt=1)
    gtol: Number = Field(_SOLVER_DEFAULTS.gtol, gt=0, lt=1)
    qtol: Number = Field(_SOLVER_DEFAULTS.qtol, gt=0, lt=1)
    settle_steps: Count = Field(_SOLVER_DEFAULTS.settle_steps, gt=0)


class FitConfig(BaseModel):
    """Validated fit settings. Unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["static", "laminar_flow"] = "laminar_flow"
    gap: Number | None = Field(None, gt=0, description="gap L, Å")
    tile: Count | None = Field(None, ge=8, le=4096, description="frames per tile; default: a store's chunk, else 128")
    memory: Literal["auto", "hold", "stream"] = "auto"
    covariance: Literal["inflated", "naive"] = "inflated"  # see xpcsfit.leastsq.uncertainty
    initial: dict[str, Number] = {}
    bounds: dict[str, tuple[Number, Number]] = {}
    solver: SolverOptions = SolverOptions()
    starts: Count = Field(1, ge=1, le=1000, description="fits from this many starts (Latin hypercube), best kept")
    starts_seed: Count = Field(0, ge=0, description="seed of the Latin hypercube starts")

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
            # a width that overflows would make the solver's scaling and start margin inf
            if not (lo < hi and math.isfinite(hi - lo)):
                raise ValueError(f"bounds.{name}: need lower < upper and a finite width, got [{lo}, {hi}]")
        for name, value in self.initial.items():
            lo, hi = self.bound(name)
            if not lo <= value <= hi:
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
        One line: an unreadable or non-UTF-8 file, bad YAML (with its line and column),
        a key given twice, a top level that is not a mapping, or an unknown key or
        bad value (naming the key and the value given). Problems of the file name the
        file; of an override, the option.
    """
    where = "config"
    if source is None:
        data = {}
    elif isinstance(source, FitConfig):
        data = source.model_dump()
    elif isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, (str, Path)):
        where = str(source)
        data = read_yaml_mapping(Path(source))
    else:
        raise ConfigError(f"config = {source!r}: expected a YAML file, a mapping or a FitConfig")
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        return FitConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where, given)) from None


def read_yaml_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML file; ConfigError naming the file (and line)."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); is this a YAML file?"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc, text)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None:  # an empty file or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of settings (key: value) at the top level, "
            f"got {type(data).__name__} {short_repr(data)}"
        )
    return data


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """'line L, column C: not valid YAML (problem)' from a PyYAML load error."""
    line = None
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            line, column = mark.line + 1, mark.column + 1
        problem = exc.problem or exc.context or "syntax error"
    elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        problem = f"character #x{exc.character:02x}: {exc.reason}"
    else:
        problem = str(exc)
    where = f"line {line}, column {column}: " if line is not None else ""
    return f"{where}not valid YAML ({' '.join(str(problem).split())})"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def validation_message(exc: ValidationError, where: str, overrides: dict, model=None) -> str:
    """One line for pydantic's first error: where, the key, what is wrong, the value.

    ``model``: the model validated (FitConfig, or a subclass with more keys, e.g. the
    batch settings), whose keys an unknown key's message lists.
    """
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # from _check_parameters: its message names the key and the value
        return f"{where}: {msg}"
    if err["type"] == "extra_forbidden":
        model = SolverOptions if loc[0] == "solver" and len(loc) > 1 else (model or FitConfig)
        msg = f"unknown key (known: {', '.join(model.model_fields)})"
    source = "option " if loc[0] in overrides else f"{where}: "
    return f"{source}{'.'.join(loc)}: {msg} (got {short_repr(err['input'])})"


def short_repr(value, limit: int = 60) -> str:
    """repr of a value given by the user, on one line and at most ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
