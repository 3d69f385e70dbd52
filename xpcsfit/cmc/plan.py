"""What a CMC run conditions on, fixed before any cluster starts.

The options (:func:`check_options`), the least-squares fit the shards start from
(:class:`InitialFit`, and what it decides when not given: :func:`defaults_from_fit`),
and the :class:`Plan`: configuration, sampling coordinates, the opened selection, its
tiles and the number of shards K when given; else K is chosen once the data's precision
is known (:func:`choose_shards`, :class:`ShardChoice`). :class:`CMCRun` is all of it
together with the noise model, as :mod:`xpcsfit.cmc.results` records it.
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

MIN_POINTS_PER_SHARD = 1_000
DEFAULT_THIN = 2
# The default K keeps each shard's Laplace relative sd of every level (J's, gamma_dot's
# window mean) at or below this. Measured (NUTS, 2 x (500 + 500)): shards at 5.3 % pass
# their diagnostics (flow_small, K = 4), at 7.4 % they start to fail (K = 8: bulk ESS
# 304), at 17 % they fail badly (a 1000-frame, 23-phi map cut into 72 shards of 40 000
# points: 426 divergent transitions of 1000, R-hat 1.06, phi0 unconstrained): with too
# little data a shard's posterior is its prior^(1/K), wide and far from Gaussian.
MAX_LEVEL_RELATIVE_SD = 0.06
PROBE_POINTS = 60_000  # lattice points of the shard the data's precision is measured on


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
    n_shards : int or None
        K; None until :func:`choose_shards` has set it from the data (when not given).
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
    n_shards: int | None
    layout: ParameterLayout
    tiles: list

    def describe(self, sampler: SamplerSettings) -> str:
        """The progress line announcing the run."""
        ds, K = self.ds, self.n_shards
        cut = (f"{K} shards of ~{self.n_lattice // K:,} points" if K else
               f"{self.n_lattice:,} points into shards (how many: after the least-squares fit)")
        return (f"xpcsfit cmc: {self.cfg.mode}, {ds.attrs['source']}: {ds.sizes['q']} q × "
                f"{ds.sizes['phi']} phi × {ds.sizes['t1']} frames; {cut} (every {self.thin}. frame in t1 "
                f"and t2), {sampler.chains} chains × ({sampler.warmup} warm-up + {sampler.samples}) draws each")


@dataclass(frozen=True)
class ShardChoice:
    """How K was set, and how well each shard's data determine the levels.

    Attributes
    ----------
    n_shards : int
        K.
    given : bool
        K was asked for (``shards=``), not chosen.
    level_relative_sd : dict
        Sampling coordinate name (:attr:`Coordinates.level_names`) -> its Laplace sd on
        all the points, relative to its least-squares value; a shard of 1/K of the
        points (prior^(1/K)) has √K times it.
    most_by_information : int
        The largest K whose shards keep every level's relative sd at or below
        :data:`MAX_LEVEL_RELATIVE_SD`.
    worker_threads : int
        Threads of the cluster's workers when K was set.
    """

    n_shards: int
    given: bool
    level_relative_sd: dict
    most_by_information: int
    worker_threads: int

    def shard_relative_sd(self) -> dict:
        """Level name -> relative sd in one shard of this K."""
        return {n: v * math.sqrt(self.n_shards) for n, v in self.level_relative_sd.items()}

    def describe(self, n_lattice: int) -> str:
        """The progress line: K, why, and the shards' precision."""
        K = self.n_shards
        why = ("as given" if self.given else
               f"the smaller of the cluster's {self.worker_threads} worker threads and the "
               f"{self.most_by_information} shards the data support")
        sd = ", ".join(f"{n} {100 * v:.2g} %" for n, v in self.shard_relative_sd().items())
        return f"xpcsfit cmc: {K} shards of ~{n_lattice // K:,} points ({why}); relative sd per shard: {sd}"

    def warning(self) -> str | None:
        """A warning when the given K cuts the data finer than they support, else None."""
        if self.n_shards <= self.most_by_information:
            return None
        worst = max(self.shard_relative_sd().items(), key=lambda kv: kv[1])
        return (f"{self.n_shards} shards determine {worst[0]} only to {100 * worst[1]:.2g} % each (at most "
                f"{self.most_by_information} keep every level within {100 * MAX_LEVEL_RELATIVE_SD:g} %): expect "
                "shards failing their diagnostics and a combination that is not the posterior")


def choose_shards(given, n_lattice: int, level_relative_sd: dict, worker_threads: int) -> ShardChoice:
    """K: ``given``, else as many as the cluster has worker threads, as long as each
    shard still determines every level within :data:`MAX_LEVEL_RELATIVE_SD`.

    More shards than threads buy no speed (the shards' total cost is about that of one
    run on all points) and make every sub-posterior wider and less Gaussian; so K never
    exceeds the threads, and never the data's support.

    Parameters
    ----------
    given : int or None
        The K asked for (already checked by :func:`check_shards`).
    n_lattice : int
        Lattice points of the selection.
    level_relative_sd : dict
        Level name -> Laplace relative sd on all points (non-finite: not determined).
    worker_threads : int
        Threads of the cluster's workers (0 when none is up: counted as 1).
    """
    values = np.asarray(list(level_relative_sd.values()), float)
    worst = values.max() if np.all(np.isfinite(values)) else np.inf  # max() of a NaN depends on order
    by_points = max(1, n_lattice // MIN_POINTS_PER_SHARD)
    if np.isfinite(worst) and worst > 0:
        by_information = int(max(1, min(by_points, math.floor((MAX_LEVEL_RELATIVE_SD / worst) ** 2))))
    else:
        by_information = 1
    K = int(given) if given is not None else min(by_information, max(1, int(worker_threads)))
    return ShardChoice(n_shards=K, given=given is not None,
                       level_relative_sd={n: float(v) for n, v in level_relative_sd.items()},
                       most_by_information=by_information, worker_threads=int(worker_threads))


@dataclass(frozen=True)
class CMCRun:
    """A plan as it ran: everything :mod:`xpcsfit.cmc.results` records besides the draws.

    ``noise`` is :func:`xpcsfit.noise.noise_model`'s dict; ``combine`` the method;
    ``shards`` how K was set (``plan.n_shards`` is then K).
    """

    plan: Plan
    sampler: SamplerSettings
    combine: str
    noise: dict
    initial: InitialFit
    shards: ShardChoice


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
                n_shards=check_shards(n_lattice, shards), layout=ParameterLayout(MODES[cfg.mode], n_q, n_phi),
                tiles=plan_tiles(ds, size))


def check_shards(n_lattice, shards) -> int | None:
    """The K asked for (None: to be chosen, :func:`choose_shards`); ConfigError when it
    leaves a shard fewer than MIN_POINTS_PER_SHARD points."""
    most = max(1, n_lattice // MIN_POINTS_PER_SHARD)
    if shards is None:
        return None
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
