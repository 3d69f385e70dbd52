"""The settings cascade of a batch run: ``xpcsfit.yaml`` files beside the data.

An ``xpcsfit.yaml`` in a directory applies to the result files below it. The settings
of one file are ``--config`` (if given), then the ``xpcsfit.yaml`` of each directory
from the file's ROOT down to the file's own directory, merged key by key: a later
(nearer) file wins, and mappings (``initial``, ``bounds``, ``solver``) are merged entry
by entry, so a sample's directory may set ``bounds.phi0`` and keep its parent's
``bounds.D0``. Directories above ROOT do not take part.

Keys: every key of :class:`xpcsfit.config.FitConfig` (mode, gap, tile, memory, initial,
bounds, solver) and the selection of :class:`BatchSettings`::

    mode: laminar_flow
    gap: 2.0e6            # Å
    q_index: [3, 8]       # or: all (the default) — the q of the file's grid to fit
    joint: false          # true: one fit of all selected q together, else one per q
    frames: [1, 400]      # inclusive 0-based frame range; default 1 .. T-1
    in_process_max_points: 16000000   # where each fit runs (see BatchSettings)

The merged mapping is validated once, as a whole (a key may be checked against another
set in a farther file, e.g. ``initial.D0`` against ``bounds.D0``); an error is one line
naming the file that gave the key (for a check across keys, every file merged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from xpcsfit.config import Count, FitConfig, read_yaml_mapping, validation_message
from xpcsfit.errors import ConfigError
from xpcsfit.leastsq.placement import (
    IN_PROCESS_MAX_POINTS as DRIVER_IN_PROCESS_MAX_POINTS,
)

SETTINGS_FILE = "xpcsfit.yaml"
# The largest unit (fitted points) that runs whole in one worker task by default: fit's
# own in-process limit (its tiles, ≤ 12 B a point, stay well inside a worker's memory);
# a batch keeps every worker busy with whole fits (see README "Batch").
IN_PROCESS_MAX_POINTS = DRIVER_IN_PROCESS_MAX_POINTS


def _q_index(value):
    """"all", an index or a list of distinct indices -> "all" or a sorted list."""
    if value == "all":
        return value
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(items, list) or not items
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)
            or len(set(items)) != len(items)):
        raise ValueError("expected all, a q index (0, 1, ...) or a list of distinct q indices")
    return sorted(items)


class BatchSettings(FitConfig):
    """FitConfig plus what a batch run selects in each file.

    Attributes
    ----------
    q_index : "all" or list of int
        Positions in the file's q grid (as ``fit --q-index``); "all": every q with maps.
    joint : bool
        One fit of all selected q together (physics shared across q) instead of one fit
        per q.
    frames : (int, int) or None
        Inclusive 0-based frame range (A, B), 1 <= A < B; None: 1 .. T-1.
    in_process_max_points : int
        A unit of at most this many fitted points runs whole inside one worker task
        (``fit(in_process=True)``: no scheduler round trip per data pass); a larger one
        fans its tile tasks out over the workers (``in_process=False``). 0: fan every
        unit out. Where a fit runs does not change its result, so this key is not part
        of the fingerprint. Default :data:`IN_PROCESS_MAX_POINTS`.
    """

    q_index: Annotated[Any, BeforeValidator(_q_index)] = "all"
    joint: StrictBool = False
    frames: tuple[Count, Count] | None = None
    in_process_max_points: Count = Field(IN_PROCESS_MAX_POINTS, ge=0)

    @field_validator("frames")
    @classmethod
    def _ordered(cls, value):
        if value is not None and not 1 <= value[0] < value[1]:
            raise ValueError("need 1 <= first < last (frame 0 sits at t = 0)")
        return value

    def fit_config(self) -> FitConfig:
        """The FitConfig part, as ``xpcsfit.fit(config=...)`` takes it."""
        return FitConfig.model_validate(self.model_dump(include=set(FitConfig.model_fields)))


@dataclass(frozen=True)
class Resolved:
    """The settings of one file: the validated merge and the files it came from.

    Attributes
    ----------
    settings : BatchSettings
    sources : tuple of str
        The --config file (or "config" for a mapping) and the xpcsfit.yaml files merged,
        farthest first.
    """

    settings: BatchSettings
    sources: tuple[str, ...]


class SettingsCascade:
    """Resolves the settings of files under the roots of one batch run.

    Each xpcsfit.yaml is read once per cascade (create one per run: an edited file is
    read again by the next run).

    Parameters
    ----------
    config : None, str, Path or dict
        The ``--config`` YAML file, or a mapping with the same keys.

    Raises
    ------
    ConfigError
        The config file cannot be read or is not a YAML mapping (naming the file).
    """

    def __init__(self, config=None):
        self._layers_of: dict[Path, dict | None] = {}
        if config is None:
            self._base = []
        elif isinstance(config, dict):
            self._base = [("config", dict(config))]
        else:
            self._base = [(str(config), read_yaml_mapping(Path(config)))]

    def resolve(self, path: str | Path, root: str | Path) -> Resolved:
        """The settings of the file ``path`` found under ``root``.

        Parameters
        ----------
        path : str or Path
            A result file at or below ``root``.
        root : str or Path
            The directory the file was found under (:attr:`Found.root`).

        Returns
        -------
        Resolved

        Raises
        ------
        ConfigError
            An xpcsfit.yaml cannot be read, is not valid YAML or not a mapping, or the
            merge has an unknown key or a bad value: one line naming the file and key.
        """
        path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
        layers = list(self._base)
        for directory in _directories(root, path.parent):
            mapping = self._read(directory)
            if mapping is not None:
                layers.append((str(directory / SETTINGS_FILE), mapping))
        merged: dict = {}
        for _, mapping in layers:
            merged = merge(merged, mapping)
        try:
            settings = BatchSettings.model_validate(merged)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            where = _source_of(layers, loc) if loc else ", ".join(w for w, _ in layers) or "config"
            raise ConfigError(validation_message(exc, where, {}, BatchSettings)) from None
        return Resolved(settings, tuple(w for w, _ in layers))

    def _read(self, directory: Path) -> dict | None:
        if directory not in self._layers_of:
            file = directory / SETTINGS_FILE
            exists = file.exists() or file.is_symlink()
            self._layers_of[directory] = read_yaml_mapping(file) if exists else None
        return self._layers_of[directory]


def merge(base: dict, over: dict) -> dict:
    """``over`` merged onto ``base`` key by key (mappings recursively); a new dict."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _directories(root: Path, directory: Path) -> list[Path]:
    """root, …, directory (directory at or below root); [directory] when it is not below root."""
    if directory != root and root not in directory.parents:
        return [directory]
    chain = [directory]
    while chain[-1] != root:
        chain.append(chain[-1].parent)
    return chain[::-1]


def _source_of(layers, loc) -> str:
    """The nearest layer that sets the key at ``loc`` (or its longest present prefix)."""
    for where, mapping in reversed(layers):
        node = mapping
        for part in loc:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return where
    for where, mapping in reversed(layers):  # e.g. a list element: the layer giving the list
        if loc[0] in mapping:
            return where
    return layers[-1][0] if layers else "config"
