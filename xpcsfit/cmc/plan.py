"""What a CMC run conditions on, fixed before any cluster starts.

The options (:func:`check_options`), the least-squares fit the shards start from
(:class:`InitialFit`, and what it decides when not given: :func:`defaults_from_fit`),
and the :class:`Plan`: configuration, sampling coordinates, the opened selection, its
tiles and the number of shards K. :class:`CMCRun` is all of it together with the noise
model, as :mod:`xpcsfit.cmc.results` records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from xpcsfit.cmc.combine import COMBINE_METHODS
from xpcsfit.cmc.coordinates import Coordinates
from xpcsfit.cmc.shard import SamplerSettings
from xpcsfit.config import FitConfig, load_config
from xpcsfit.engine.tiles import DEFAULT_TILE, plan_tiles
from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io.dataset import open_dataset
from xpcsfit.leastsq.results import FitResult
from xpcsfit.parameters import MODES, ParameterLayout, resolve_gap

TARGET_POINTS_PER_SHARD = 40_000  # lattice points; ~2-3 ms per gradient on one core
MIN_POINTS_PER_SHARD = 1_000
DEFAULT_THIN = 2


@dataclass(frozen=True)
class Selection:
    """The data selection, as :func:`xpcsfit.open_dataset`'s keywords (None: its default)."""

    q: object = None
    q_index: object = None
    phi: object = None
    frames: object = None
    dt: float | None = None

    def kwargs(self) -> dict:
        return dict(q=self.q, q_index=self.q_index, phi=self.phi, frames=self.frames, dt=self.dt)


@dataclass(frozen=True)
class InitialFit:
    """The least-squares fit the shards start from (initial point, noise level).

    Attributes
    ----------
    result : FitResult
    source : str
        Where it came from, for messages and summary.json: the fit.json path,
        "FitResult", or "least-squares fit run by cmc".
    ran_here : bool
        Run by cmc (then also written to DIR/initial_fit.json).
    """

    result: FitResult
    source: str
    ran_here: bool = False


@dataclass(frozen=True)
class Plan:
    """What a run conditions on and how it is cut; fixed before any cluster starts.

    Attributes
    ----------
    cfg : FitConfig
    coords : Coordinates
    ds : xarray.Dataset
        The selection (:func:`xpcsfit.open_dataset`).
    L : float
        Gap, Å.
    thin : int
        Lattice stride, frames.
    tile : int
        Tile edge, frames.
    n_lattice : int
        Lattice points over all bins.
    n_shards : int
        K.
    layout : ParameterLayout
    tiles : list of TileSpec
    """

    cfg: FitConfig
    coords: Coordinates
    ds: object
    L: float
    thin: int
    tile: int
    n_lattice: int
    n_shards: int
    layout: ParameterLayout
    tiles: list

    def describe(self, sampler: SamplerSettings) -> str:
        """The progress line announcing the run."""
        ds, K = self.ds, self.n_shards
        return (f"xpcsfit cmc: {self.cfg.mode}, {ds.attrs['source']}: {ds.sizes['q']} q × "
                f"{ds.sizes['phi']} phi × {ds.sizes['t1']} frames; {K} shards of ~{self.n_lattice // K:,} "
                f"points (every {self.thin}. frame in t1 and t2), {sampler.chains} chains × "
                f"({sampler.warmup} warm-up + {sampler.samples}) draws each")


@dataclass(frozen=True)
class CMCRun:
    """A plan as it ran: everything :mod:`xpcsfit.cmc.results` records besides the draws.

    ``noise`` is :func:`xpcsfit.noise.noise_model`'s dict; ``combine`` the method.
    """

    plan: Plan
    sampler: SamplerSettings
    combine: str
    noise: dict
    initial: InitialFit


def check_options(shards, warmup, samples, chains, thin, combine, seed, target_accept) -> SamplerSettings:
    """Check the options (ConfigError naming the first bad one); the sampler settings."""

    def positive(name, value, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}: need an integer >= 1, got {value!r}")

    positive("shards", shards, allow_none=True)
    positive("warmup", warmup)
    positive("samples", samples)
    positive("chains", chains)
    positive("thin", thin, allow_none=True)
    if combine not in COMBINE_METHODS:
        raise ConfigError(f"combine: unknown method {combine!r}; choose one of {', '.join(COMBINE_METHODS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: need an integer >= 0, got {seed!r}")
    if (isinstance(target_accept, bool) or not isinstance(target_accept, (int, float, np.floating))
            or not 0.0 < target_accept < 1.0):
        raise ConfigError(f"target_accept: need a number between 0 and 1, got {target_accept!r}")
    return SamplerSettings(warmup=int(warmup), samples=int(samples), chains=int(chains), seed=int(seed),
                           target_accept=float(target_accept))


def initial_fit(source) -> InitialFit:
    """The fit of ``from_fit``: a FitResult, or fit.json (or its directory).

    Raises InputError for a missing or malformed fit.json, or one cmc cannot start from
    (non-finite values, no input frames or dt).
    """
    if isinstance(source, FitResult):
        return InitialFit(source, "FitResult")
    path = Path(source)
    if path.is_dir():
        path = path / "fit.json"
    result = FitResult.from_json(path)
    inp = result.input
    missing = [key for key in ("frames", "dt") if key not in inp]
    if missing:
        raise InputError(f"{path}: malformed fit.json (missing key 'input.{missing[0]}')")
    if not all(np.all(np.isfinite(a)) for a in (result.values, result.contrast, result.offset)):
        raise InputError(f"{path}: malformed fit.json (non-finite parameter values)")
    if len(inp["frames"]) != 2:
        raise InputError(f"{path}: malformed fit.json (input.frames must be [first, last])")
    return InitialFit(result, str(path))


def _fit_settings(result: FitResult) -> dict:
    """The settings a fit recorded (fit.json's provenance.config), or {}."""
    return (result.provenance or {}).get("config", {})


def defaults_from_fit(initial: InitialFit, mode, gap, selection: Selection, config):
    """(mode, gap, selection, config) with what is not given taken from the fit.

    Raises ConfigError when the given mode or gap contradict the fit's.
    """
    r, src = initial.result, initial.source
    mode = mode or r.mode
    if r.mode != mode:
        raise ConfigError(f"{src}: is a {r.mode} fit, not {mode}")
    fit_gap = (r.input or {}).get("L")  # the gap the fit used, recorded once
    if gap is not None and fit_gap is not None and not math.isclose(gap, fit_gap):
        raise ConfigError(f"{src}: was fitted with gap {fit_gap:.6g} Å, not {gap:.6g} Å")
    gap = gap if gap is not None else fit_gap
    inp = r.input or {}
    if selection.q is None and selection.q_index is None:
        q_index = [int(i) for i in inp.get("q_index") or []] or None
        selection = replace(selection, q_index=q_index, q=None if q_index else [float(v) for v in r.q])
    if selection.phi is None:
        selection = replace(selection, phi=[float(v) for v in r.phi])
    if selection.frames is None:
        selection = replace(selection, frames=tuple(inp.get("frames", [])))
    if selection.dt is None:
        selection = replace(selection, dt=inp.get("dt"))
    bounds = _fit_settings(r).get("bounds")
    if config is None and bounds:
        config = {"bounds": dict(bounds)}
    return mode, gap, selection, config


def make_plan(input, selection: Selection, mode, gap, config, shards, thin,
              initial: InitialFit | None = None) -> Plan:
    """Configuration, coordinates, the opened selection and its cut into tiles and shards.

    Raises ConfigError (bounds cmc cannot use, too many shards, a selection that does
    not match ``initial``) and InputError (unreadable input); warns GapWarning when a
    laminar_flow gap is defaulted.
    """
    cfg = load_config(config, mode=mode, gap=gap)
    thin = DEFAULT_THIN if thin is None else int(thin)
    ds = open_dataset(input, **selection.kwargs())
    coords = Coordinates.from_config(cfg, ds["t1"].values)
    L, _ = resolve_gap(cfg, ds, stacklevel=3)  # the warning names the caller of cmc
    n_q, n_phi, n_t = ds.sizes["q"], ds.sizes["phi"], ds.sizes["t1"]
    m = -(-n_t // thin)
    n_lattice = n_q * n_phi * m * (m - 1) // 2
    size = min(DEFAULT_TILE, n_t)
    if initial is not None:
        check_matches(initial, ds)
    return Plan(cfg=cfg, coords=coords, ds=ds, L=float(L), thin=thin, tile=size, n_lattice=n_lattice,
                n_shards=shard_count(n_lattice, shards), layout=ParameterLayout(MODES[cfg.mode], n_q, n_phi),
                tiles=plan_tiles(ds, size))


def shard_count(n_lattice, shards) -> int:
    """K: given, else about TARGET_POINTS_PER_SHARD lattice points per shard."""
    most = max(1, n_lattice // MIN_POINTS_PER_SHARD)
    if shards is None:
        return int(min(most, max(1, math.ceil(n_lattice / TARGET_POINTS_PER_SHARD))))
    if shards > most:
        raise ConfigError(f"shards: {shards} is too many for {n_lattice:,} points; at most {most} "
                          f"(>= {MIN_POINTS_PER_SHARD:,} points per shard); select more data or a smaller thin")
    return int(shards)


def check_matches(initial: InitialFit, ds) -> None:
    """Raise ConfigError unless the fit was made on this file and selection."""
    r, src = initial.result, initial.source
    inp = r.input or {}
    sha = inp.get("sha256")
    if sha and ds.attrs.get("sha256") and sha != ds.attrs["sha256"]:
        raise ConfigError(f"{src}: was fitted to {inp.get('path')} (sha256 {sha[:12]}…), "
                          f"not to {ds.attrs['source']}")
    for key, want, have in (("q", r.q, ds["q"].values), ("phi", r.phi, ds["phi"].values)):
        want = np.asarray(want, float)
        if want.shape != have.shape or not np.allclose(want, have, rtol=1e-6):
            raise ConfigError(f"{src}: was fitted for {key} = {np.round(want, 6).tolist()}, "
                              f"the selection has {np.round(have, 6).tolist()}")
    frames = list(inp.get("frames", []))
    if frames and frames != list(ds.attrs["frames"]):
        raise ConfigError(f"{src}: was fitted for frames {frames}, the selection has {list(ds.attrs['frames'])}")
