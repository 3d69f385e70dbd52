"""Bad input, tried systematically: mutated result files and config files.

One small valid APS-U file (1 q × 2 phi × 40 frames, :func:`xpcsfit.simulate.simulate`)
and its legacy-layout twin are copied and mutated per example: keys the reader uses
deleted, replaced by other types, shapes or dtypes, edited, maps shortened or given
NaN/Inf blocks, processed_bins reordered or duplicated, the file truncated or its bytes
overwritten. Config files get wrong types and values, unknown keys, inverted bounds,
nested garbage, non-mapping YAML, broken syntax and binary bytes.

The property checked for every case, through ``xpcsfit.cli.main`` in this process:
either the fit runs (exit 0 or 4, fit.json written) or the command ends with exit 2/3
and exactly one stderr line ``xpcsfit: error: …`` naming the file and the key or value
at fault; never a traceback. Errors known from metadata come before the fit touches the
cluster (the NaN/Inf check runs as the workers load the tiles, by design). Reordered
bins must move the maps to the cells the file's own mapping names (checked on a
2 q × 2 phi file); duplicated bins are rejected. Cases that pass validation are fitted
on the session's cluster (``client``) in static mode, a second or two each; that cost
sets the numbers of examples.

Hypothesis runs derandomized with a fixed number of examples per property, so CI sees
the same cases every time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import h5py
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import yaml
from hypothesis import (
    HealthCheck,
    assume,
    currently_in_test_context,
    event,
    given,
    settings,
)
from hypothesis import strategies as st

from xpcsfit.cli import main
from xpcsfit.config import load_config
from xpcsfit.errors import ConfigError, InputError
from xpcsfit.io import apsu, legacy
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.legacy import write_legacy
from xpcsfit.leastsq import driver as _fit
from xpcsfit.simulate import simulate

N_FRAMES = 40
APSU_MAP_KEYS = [f"{apsu.MAPS}/c2_{i:05d}" for i in range(1, 3)]  # the fitted file: phi 45°, 135°
LEGACY_MAP_KEYS = [f"{legacy.MAPS}/g2_{i:05d}" for i in range(1, 3)]
GRID_CELLS = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (q index, phi index) of c2_00001 … c2_00004, grid file
GRID_MAP_KEYS = [f"{apsu.MAPS}/c2_{i:05d}" for i in range(1, 5)]

# Keys a message may name for a mutation of each key: the key itself and the keys it
# is checked against.
TIME_STEP = "time step"
RELATED = {
    apsu.BINS: [apsu.BINS, apsu.MAPS, apsu.INDEX_MAPPING],
    apsu.Q: [apsu.Q, apsu.NUM_PTS],
    apsu.PHI: [apsu.PHI, apsu.NUM_PTS],
    apsu.INDEX_MAPPING: [apsu.INDEX_MAPPING, apsu.BINS],
    apsu.NUM_PTS: [apsu.NUM_PTS],
    apsu.MAP_NAMES: [apsu.MAP_NAMES],
    apsu.FRAME_TIME: [apsu.FRAME_TIME, TIME_STEP],
    apsu.STRIDE: [apsu.STRIDE, TIME_STEP],
    apsu.AVG: [apsu.AVG, TIME_STEP],
    apsu.MAPS: [apsu.MAPS],
    legacy.Q: [legacy.Q, legacy.MAPS],
    legacy.PHI: [legacy.PHI, legacy.MAPS],
    legacy.EXPOSURE: [legacy.EXPOSURE, TIME_STEP],
    legacy.AVG: [legacy.AVG, TIME_STEP],
    legacy.STRIDE: [legacy.STRIDE, TIME_STEP],
    legacy.MAPS: [legacy.MAPS],
}
for _key in APSU_MAP_KEYS:
    RELATED[_key] = [_key.rsplit("/", 1)[1], apsu.MAPS, apsu.BINS, "non-finite c2 values"]
for _key in LEGACY_MAP_KEYS:
    RELATED[_key] = [_key.rsplit("/", 1)[1], legacy.MAPS, legacy.Q, "non-finite c2 values"]
LEGACY_KEYS = [legacy.Q, legacy.PHI, legacy.EXPOSURE, legacy.AVG, legacy.STRIDE,
               legacy.MAPS, *LEGACY_MAP_KEYS]
APSU_KEYS = [k for k in RELATED if k not in LEGACY_KEYS]

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------- the valid files


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    """The valid APS-U file, its legacy twin (same maps, q, phi, dt), and a 2 q × 2 phi file."""
    d = tmp_path_factory.mktemp("valid")
    aps = simulate(d / "aps.hdf", q=(0.0055,), n_phi=2, n_frames=N_FRAMES, noise=0.01, seed=5)
    with h5py.File(aps, "r") as f:
        maps = {(0, ip): f[key][()] for ip, key in enumerate(APSU_MAP_KEYS)}
        q_grid, phi_grid = f[apsu.Q][()], f[apsu.PHI][()]
    legacy = write_legacy(d / "legacy.hdf", q_grid=q_grid, phi_grid=phi_grid, maps=maps,
                          exposure_period=0.1, avg_frames=1, stride_frames=1)
    grid = simulate(d / "grid.hdf", q=(0.004, 0.0055), n_phi=2, n_frames=N_FRAMES, noise=0.01, seed=6)
    with h5py.File(grid, "r") as f:
        maps = {cell: f[key][()] for cell, key in zip(GRID_CELLS, GRID_MAP_KEYS)}
        q_grid, phi_grid = f[apsu.Q][()], f[apsu.PHI][()]
    grid_legacy = write_legacy(d / "grid_legacy.hdf", q_grid=q_grid, phi_grid=phi_grid, maps=maps,
                               exposure_period=0.1)
    return {"aps-u": aps, "legacy": legacy, "grid": grid, "grid-legacy": grid_legacy}


BASE_CONFIG = {
    "mode": "static",
    "initial": {"D0": 15000.0},
    "bounds": {"D0": [100.0, 1.0e5]},
    "solver": {"max_iterations": 30, "ftol": 1.0e-8},
}


# --------------------------------------------------------------------------- running the command


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    loaded: bool


def run_fit(capsys, input_path, out, *extra) -> Outcome:
    """``xpcsfit fit INPUT --out OUT …`` in this process; records whether the fit got to
    loading its tiles (its evaluator, in process or on a cluster: the long work)."""
    capsys.readouterr()
    formatwarning = warnings.formatwarning  # main() sets the CLI's; keep pytest's for other tests
    try:
        with mock.patch.object(_fit, "fit_evaluator", wraps=_fit.fit_evaluator) as spy:
            rc = main(["fit", str(input_path), "--out", str(out), *map(str, extra)])
    finally:
        warnings.formatwarning = formatwarning
    cap = capsys.readouterr()
    return Outcome(rc, cap.out, cap.err, spy.called)


def _event(label: str) -> None:
    """Count an outcome in hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(label)


def check(o: Outcome, out: Path, must_name, alternatives, *, loading_ok=False) -> str:
    """The one property: a fit with fit.json, or one line naming ``must_name`` and one alternative.

    Returns "fit" or "error" (for the tests that know which to expect).
    """
    assert "Traceback" not in o.err, o.err
    if o.rc in (0, 4):
        result = json.loads((out / "fit.json").read_text())
        assert result["converged"] == (o.rc == 0)
        _event("fit")
        return "fit"
    lines = o.err.splitlines()
    assert len(lines) == 1, o.err
    line = lines[0]
    assert line.startswith("xpcsfit: error: "), line
    assert o.rc in (2, 3), (o.rc, line)
    assert must_name in line, (must_name, line)
    assert any(a in line for a in alternatives), (alternatives, line)
    # a model that overflows at the fitted parameters is known only from evaluating it
    if not loading_ok and "the model is not finite" not in line:
        assert not o.loaded, f"rejected only after the tiles were loading: {line}"
    assert not (out / "fit.json").exists()
    _event(f"error rc={o.rc}")
    return "error"


# --------------------------------------------------------------------------- file mutations


GROUP = "group"
EMPTY = "empty"

dtypes = st.sampled_from(["i1", "i8", "u2", "f2", "f4", "f8", "c8", "?", "S3"]).map(np.dtype)
garbage_arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
odd_numbers = st.sampled_from([0, -1, 1, 2, 3, 7, 100, -0.5, 0.5, 2.5, 1e-300, 1e300,
                               np.nan, np.inf, -np.inf, 2**40])
garbage_values = st.one_of(
    garbage_arrays,
    odd_numbers.map(np.float64),
    odd_numbers.filter(lambda v: np.isfinite(v) and v == int(v) and abs(v) < 2**62).map(np.int64),
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=8),
    st.binary(max_size=8).map(np.bytes_),
    st.just(GROUP),
    st.just(EMPTY),
    st.sampled_from(["link"]).flatmap(lambda _: st.sampled_from(
        ["/xpcs/qmap/dynamic_v_list_dim0", "/entry/instrument/detector_1/frame_time",
         "/xpcs/twotime/correlation_map/c2_00002", "/nowhere/at/all"])).map(lambda t: ("link", t)),
)


def _put(f: h5py.File, key: str, value) -> None:
    """Replace ``key`` (dataset, group or link) by ``value``."""
    if f.get(key, getlink=True) is not None:
        del f[key]
    if isinstance(value, str) and value == GROUP:
        f.create_group(key)
    elif isinstance(value, str) and value == EMPTY:
        f.create_dataset(key, data=h5py.Empty("f8"))
    elif isinstance(value, tuple) and value[0] == "link":
        f[key] = h5py.SoftLink(value[1])
    else:
        f[key] = value


@st.composite
def file_mutation(draw, layout):
    """(description, apply(h5py.File), key, loading_ok) for one mutation of a valid file."""
    keys = APSU_KEYS if layout == "aps-u" else LEGACY_KEYS
    map_keys = APSU_MAP_KEYS if layout == "aps-u" else LEGACY_MAP_KEYS
    key = draw(st.sampled_from(keys))
    if key in (apsu.MAPS, legacy.MAPS):
        kinds = ["delete", "replace"]
    else:
        kinds = ["delete", "replace", "recast", "reshape", "edit"]
    if key in map_keys:
        kinds += ["nonfinite block", "shorten", "finite garbage"]
    if key == apsu.BINS:
        kinds += ["permute", "duplicate"]
    kind = draw(st.sampled_from(kinds))
    loading_ok = False

    if kind == "delete":
        def apply(f):
            del f[key]
    elif kind == "replace":
        value = draw(garbage_values)

        def apply(f):
            _put(f, key, value)
    elif kind == "recast":
        dtype = draw(dtypes)

        def apply(f):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NaN → int casts warn; the value is the point
                try:
                    new = np.asarray(f[key][()]).astype(dtype)
                except (ValueError, TypeError):  # b"q" has no int value: not a mutation
                    assume(False)
            _put(f, key, new)
    elif kind == "reshape":
        how = draw(st.sampled_from(["row", "column", "flat", "shorter", "longer", "scalar"]))

        def apply(f):
            v = np.asarray(f[key][()])
            new = {"row": lambda: v.reshape(1, -1), "column": lambda: v.reshape(-1, 1),
                   "flat": lambda: v.ravel(), "shorter": lambda: v.ravel()[:-1],
                   "longer": lambda: np.concatenate([v.ravel(), v.ravel()[:1]]),
                   "scalar": lambda: v.ravel()[0] if v.size else v}[how]()
            _put(f, key, new)
    elif kind == "edit":
        number = draw(odd_numbers)
        where = draw(st.integers(0, 3))

        def apply(f):
            v = np.array(f[key][()])
            if v.size == 0 or v.dtype.kind not in "iuf":
                return
            flat = v.reshape(-1)
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                flat[where % flat.size] = np.array(number).astype(v.dtype)  # may wrap: still a value
            _put(f, key, flat.reshape(v.shape))
    elif kind == "nonfinite block":
        r0 = draw(st.integers(0, N_FRAMES - 1))
        # mostly at or right of the diagonal, where it decides the outcome
        c0 = draw(st.integers(0, N_FRAMES - 1) | st.integers(r0, N_FRAMES - 1) | st.integers(r0, N_FRAMES - 1))
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        rows, cols = np.arange(r0, min(r0 + h, N_FRAMES)), np.arange(c0, min(c0 + w, N_FRAMES))
        # fitted points: frames 1 … T-1 (the default selection), t2 > t1
        fitted = bool(((cols[None, :] > rows[:, None]) & (rows[:, None] >= 1)).any())
        kind = f"nonfinite block ({'fitted' if fitted else 'not fitted'})"
        loading_ok = True

        def apply(f):
            f[key][r0 : r0 + h, c0 : c0 + w] = value
    elif kind == "shorten":
        side = draw(st.sampled_from([(N_FRAMES - 1, N_FRAMES - 1), (N_FRAMES, N_FRAMES - 1),
                                     (2, 2), (0, 0), (N_FRAMES,), (1, N_FRAMES, N_FRAMES)]))

        def apply(f):
            v = f[key][()]
            _put(f, key, np.resize(v, side).astype(np.float32))
    elif kind == "finite garbage":
        value = draw(st.sampled_from([0.0, -3.0, 1e30, 1.0]))

        def apply(f):
            f[key][...] = value
    elif kind == "permute":
        perm = draw(st.permutations(range(2)))

        def apply(f):
            f[key][...] = f[key][()][list(perm)]
    else:  # duplicate
        i, j = draw(st.sampled_from([(0, 1), (1, 0)]))

        def apply(f):
            v = f[key][()]
            v[j] = v[i]
            f[key][...] = v
    return f"{kind} {key}", apply, key, loading_ok


def _mutated_file_case(capsys, valid, layout, mutation):
    description, apply, key, loading_ok = mutation
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"mutated_{layout.replace('-', '')}.hdf"
        shutil.copy(valid[layout], path)
        with h5py.File(path, "r+") as f:
            apply(f)
        o = run_fit(capsys, path, Path(tmp) / "out", "--mode", "static")
        # an edited grid may leave a selected (q, phi) without a map: named by its values
        outcome = check(o, Path(tmp) / "out", str(path), RELATED[key] + ["cannot read", "no two-time map for q="],
                        loading_ok=loading_ok)
    if description.startswith("nonfinite block (fitted"):
        assert outcome == "error", f"{description}: fitted despite NaN/Inf in fitted points"
    if description.startswith(("nonfinite block (not fitted", "permute")):
        assert outcome == "fit", f"{description}: valid data rejected: {o.err}"
    if description.startswith("duplicate"):
        assert outcome == "error" and "both belong to bin" in o.err, o.err
    if description.startswith("delete"):
        optional = key in (legacy.AVG, legacy.STRIDE)
        assert outcome == ("fit" if optional else "error"), (description, o.err)
    _event(description.split(" /")[0])


@pytest.mark.slow
@settings(max_examples=40, **SETTINGS)
@given(mutation=file_mutation("aps-u"))
def test_mutated_aps_u_file_fits_or_fails_in_one_line(mutation, valid, client, capsys):
    _mutated_file_case(capsys, valid, "aps-u", mutation)


@pytest.mark.slow
@settings(max_examples=20, **SETTINGS)
@given(mutation=file_mutation("legacy"))
def test_mutated_legacy_file_fits_or_fails_in_one_line(mutation, valid, client, capsys):
    _mutated_file_case(capsys, valid, "legacy", mutation)


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_damaged_file_bytes_fail_in_one_line(data, valid, client, capsys):
    """The file truncated on disk, or a run of its bytes overwritten (metadata or an LZF chunk)."""
    raw = valid["aps-u"].read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        damaged = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
        _event("truncated")
    else:
        start = data.draw(st.integers(0, len(raw) - 1), label="offset")
        junk = data.draw(st.binary(min_size=1, max_size=64), label="bytes")
        damaged = raw[:start] + junk + raw[start + len(junk):]
        damaged = damaged[: len(raw)]
        _event("overwritten")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "damaged.hdf"
        path.write_bytes(damaged)
        o = run_fit(capsys, path, Path(tmp) / "out", "--mode", "static")
        # a damaged chunk is found when a worker reads it; anything else at open
        words = ["not an HDF5 file", "cannot open", "cannot read", "/xpcs/", "/entry/", "c2_", "non-finite c2 values"]
        outcome = check(o, Path(tmp) / "out", str(path), words, loading_ok=True)
    if len(damaged) < len(raw):
        assert outcome == "error", "a truncated file was fitted"


# --------------------------------------------------------------------------- bin assignment


@settings(max_examples=40, **SETTINGS)
@given(layout=st.sampled_from(["aps-u", "legacy"]), perm=st.permutations(range(4)),
       mapping=st.permutations(range(4)), phi_q_order=st.booleans(),
       duplicate=st.sampled_from([None, (0, 1), (1, 3), (3, 0)]))
def test_reordered_bins_move_maps_consistently(layout, perm, mapping, phi_q_order, duplicate, valid):
    """Map k is put where the file says (processed_bins → dynamic_index_mapping → map_names
    grid, or dqlist/dphilist); two maps claiming one bin are rejected, naming both."""
    with h5py.File(valid["grid"], "r") as f:
        original = [f[k][()] for k in GRID_MAP_KEYS]
        q_grid, phi_grid = f[apsu.Q][()], f[apsu.PHI][()]
    target = [GRID_CELLS[p] for p in perm]  # map k (0-based) → (q index, phi index)
    if duplicate is not None:
        target[duplicate[1]] = target[duplicate[0]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reordered.hdf"
        shutil.copy(valid["grid" if layout == "aps-u" else "grid-legacy"], path)
        with h5py.File(path, "r+") as f:
            if layout == "legacy":
                f[legacy.Q][0, :] = [q_grid[iq] for iq, _ in target]
                f[legacy.PHI][0, :] = [phi_grid[ip] for _, ip in target]
            else:
                n_q, n_phi = q_grid.size, phi_grid.size
                if phi_q_order:  # grid stored as [phi, q]: absolute = phi index * n_q + q index
                    for name, value in (("dynamic_v_list_dim0", phi_grid), ("dynamic_v_list_dim1", q_grid),
                                        ("dynamic_num_pts", [n_phi, n_q]), ("map_names", [b"phi", b"q"])):
                        _put(f, f"/xpcs/qmap/{name}", np.array(value, dtype=object if name == "map_names" else None))
                absolute = [ip * n_q + iq if phi_q_order else iq * n_phi + ip for iq, ip in target]
                f[apsu.INDEX_MAPPING][...] = list(mapping)
                f[apsu.BINS][...] = [list(mapping).index(a) + 1 for a in absolute]
        if duplicate is not None:
            with pytest.raises(InputError, match="both (belong to bin|have q=)") as err:
                open_dataset(path)
            names = [GRID_MAP_KEYS[k][-5:] for k in duplicate]
            assert all(n in str(err.value) for n in names), str(err.value)
            return
        ds = open_dataset(path, check_finite=False)
        np.testing.assert_array_equal(ds["q"].values, q_grid)
        np.testing.assert_array_equal(ds["phi"].values, phi_grid)
        c2 = ds["c2"].values
    upper = np.triu(np.ones((N_FRAMES - 1,) * 2, bool))
    for k, (iq, ip) in enumerate(target):
        np.testing.assert_array_equal(c2[iq, ip][upper], original[k][1:, 1:][upper])


# --------------------------------------------------------------------------- config mutations


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.just(10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["1e4", "128", "64", "nan", "inf", "-1", "static", "laminar_flow", "hold", "D0"]),
)
GARBAGE = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
CONFIG_PATHS = [
    ("mode",), ("gap",), ("tile",), ("memory",), ("initial",), ("bounds",), ("solver",), ("surprise",),
    ("initial", "D0"), ("initial", "alpha"), ("initial", "contrast"), ("initial", "gamma_dot_t0"),
    ("initial", "nonsense"), ("bounds", "D0"), ("bounds", "D0", 0), ("bounds", "D0", 1),
    ("bounds", "offset"), ("bounds", "phi0"), ("solver", "max_iterations"), ("solver", "ftol"),
    ("solver", "xtol"), ("solver", "gtol"), ("solver", "typo"),
]


@st.composite
def config_mutation(draw):
    """(config, path of the key changed, operation): one key of BASE_CONFIG set to garbage,
    deleted, or its bounds inverted."""
    cfg = json.loads(json.dumps(BASE_CONFIG))
    path = draw(st.sampled_from(CONFIG_PATHS))
    op = draw(st.sampled_from(["garbage", "garbage", "delete", "invert"]))
    *parents, last = path
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    if op == "invert" and path[0] == "bounds" and len(path) >= 2:
        lo, hi = cfg["bounds"].get(path[1], [0.5, 1.5])
        cfg["bounds"][path[1]] = [hi, lo]
    elif op == "delete" and isinstance(node, dict):
        node.pop(last, None)
    else:
        op = "garbage"
        node[last] = draw(GARBAGE)
    return cfg, path, op


@pytest.mark.slow
@settings(max_examples=40, **SETTINGS)
@given(case=config_mutation())
def test_mutated_config_fits_or_fails_in_one_line(case, valid, client, capsys):
    cfg, path, op = case
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "mutated.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        o = run_fit(capsys, valid["aps-u"], Path(tmp) / "out", "--config", cfg_path)
        names = [str(p) for p in path] + ["initial.", "bounds."]
        outcome = check(o, Path(tmp) / "out", str(cfg_path), names)
    if op == "invert":
        assert outcome == "error", o.out
    _event(f"{op} {'.'.join(map(str, path))}")


BROKEN_YAML = [
    "mode: static\n  gap: 1\n", "bounds: {D0: [1, 2\n", "{mode: static", "a: b: c\n", "\tmode: static\n",
    "mode: static\nmode: laminar_flow\n", "initial:\n  D0: 1.0e4\n  D0: 2.0e4\n", "? [1, 2]\n: 3\n",
    "a: *nowhere\n", "!!python/object/apply:os.system ['true']\n", "mode: 'static\n", "- 1\n- 2\n",
    "42\n", "just words\n", "[" * 2000 + "]" * 2000, "x: &a [*a]\n", "mode: static\x07\n", "%YAML 9.9\n---\n",
]


@pytest.mark.slow
@settings(max_examples=25, **SETTINGS)
@given(text=st.one_of(st.sampled_from(BROKEN_YAML).map(str.encode), st.binary(max_size=48),
                      st.text(max_size=48).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.sampled_from([b"\xff\xfe\x00m\x00o", b"mode: static\n\xc3\x28\n", b"\x89HDF\r\n\x1a\n"])))
def test_config_file_bytes_fit_or_fail_in_one_line(text, valid, client, capsys):
    """Broken syntax, non-mapping YAML, binary bytes: the line names the config file."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "raw.yaml"
        cfg_path.write_bytes(text)
        o = run_fit(capsys, valid["aps-u"], Path(tmp) / "out", "--config", cfg_path, "--mode", "static")
        check(o, Path(tmp) / "out", str(cfg_path), [""])


# --------------------------------------------------------------------------- fixed cases


def _mutate(valid, tmp_path, edit, layout="aps-u") -> Path:
    path = tmp_path / f"case_{layout.replace('-', '')}.hdf"
    shutil.copy(valid[layout], path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _set(key, value):
    return lambda f: _put(f, key, value)


def _rename_map(f):
    f.move(APSU_MAP_KEYS[0], f"{apsu.MAPS}/c2_2")  # c2_2 and c2_00002 both number 2


FILE_CASES = [
    ("frame_time array", _set(apsu.FRAME_TIME, np.array([0.1, 0.1])), "frame_time should be one real number"),
    ("frame_time string", _set(apsu.FRAME_TIME, "0.1"), "frame_time should be one real number"),
    ("frame_time complex", _set(apsu.FRAME_TIME, np.complex128(0.1 + 1j)), "frame_time should be one real number"),
    ("stride 2.5", _set(apsu.STRIDE, np.float64(2.5)), "stride_frame = 2.5 is not a positive whole number"),
    ("stride 2.0", _set(apsu.STRIDE, np.float64(2.0)), None),
    ("huge dt", lambda f: [_put(f, apsu.FRAME_TIME, 1e300), _put(f, apsu.AVG, np.int64(10**10))],
     "time step"),
    ("bins as float", _set(apsu.BINS, np.arange(1.0, 3.0)), "processed_bins should be a 1-D integer array"),
    ("bins duplicated", _set(apsu.BINS, np.array([2, 2])), "maps c2_00001 and c2_00002 both belong"),
    ("map names undecodable", _set(apsu.MAP_NAMES, np.array([b"q\xff", b"phi"], dtype=object)),
     "map_names = ['q\ufffd', 'phi'] is neither"),
    ("map number twice", _rename_map, "maps /xpcs/twotime/correlation_map/c2_00002 and c2_2 have the same number"),
    ("map dangling link", _set(APSU_MAP_KEYS[1], ("link", "/nowhere")), "cannot read /xpcs/twotime/correlation_map/c2_00002"),
    ("map int dtype", lambda f: _put(f, APSU_MAP_KEYS[1], f[APSU_MAP_KEYS[1]][()].astype(np.int32)),
     "c2_00002 has dtype int32, expected floating point"),
    ("map complex", lambda f: _put(f, APSU_MAP_KEYS[1], f[APSU_MAP_KEYS[1]][()].astype(np.complex64)),
     "expected floating point"),
    ("map shortened", lambda f: _put(f, APSU_MAP_KEYS[1], f[APSU_MAP_KEYS[1]][:-1, :-1]),
     "c2_00002 has shape (39, 39), other maps (40, 40)"),
    ("q zero", lambda f: f[apsu.Q].__setitem__(0, 0.0), "dynamic_v_list_dim0 gives q = 0 1/Å for map c2_00001"),
    ("phi repeated", lambda f: f[apsu.PHI].__setitem__(1, f[apsu.PHI][0]), "dim1 holds repeated values"),
    ("mapping not injective", _set(apsu.INDEX_MAPPING, np.array([1, 1])), "both belong to bin"),
    ("empty num_pts", _set(apsu.NUM_PTS, h5py.Empty("i8")), "dynamic_num_pts should be a 1-D integer array"),
    ("both layouts", lambda f: f.create_group(legacy.MAPS), "layout is ambiguous"),
    ("frame_time 1e300", _set(apsu.FRAME_TIME, 1e300), "time step /entry/instrument/detector_1/frame_time x "
     "stride x avg = 1e+300 s is outside 1e-09 .. 100000 s"),
    ("q 1e-300", _set(apsu.Q, np.array([1e-300])), "gives q = 1e-300 1/Å for map c2_00001, outside"),
    ("phi 1e300", lambda f: f[apsu.PHI].__setitem__(1, 1e300), "dim1 gives phi = 1e+300 deg for map c2_00002"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, edit, message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_file_case(name, edit, message, valid, client, capsys, tmp_path):
    path = _mutate(valid, tmp_path, edit)
    o = run_fit(capsys, path, tmp_path / "out", "--mode", "static")
    outcome = check(o, tmp_path / "out", str(path), [message or ""])
    assert outcome == ("fit" if message is None else "error"), o.err


LEGACY_CASES = [
    ("dqlist strings", _set(legacy.Q, np.array([[b"a", b"b"]])), "dqlist should be a non-empty 1-D array"),
    ("dqlist (2, 1)", lambda f: _put(f, legacy.Q, f[legacy.Q][()].reshape(2, 1)), "dqlist should be"),
    ("dqlist (4,)", lambda f: _put(f, legacy.Q, f[legacy.Q][0]), None),
    ("dqlist negative", lambda f: f[legacy.Q].__setitem__((0, 0), -0.004), "dqlist gives q = -0.004"),
    ("pairs repeated", lambda f: [f[k].__setitem__((0, 1), f[k][0, 0]) for k in (legacy.Q, legacy.PHI)],
     "maps g2_00001 and g2_00002 both have q=0.0055"),
    ("exposure string", _set(legacy.EXPOSURE, b"0.1"), "exposure_period should be one real number"),
    ("avg zero", _set(legacy.AVG, np.zeros((1, 1), np.int64)), "avg_frames = 0.0 is not a positive whole number"),
    ("stride deleted", lambda f: f.__delitem__(legacy.STRIDE), None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, edit, message", LEGACY_CASES, ids=[c[0] for c in LEGACY_CASES])
def test_legacy_case(name, edit, message, valid, client, capsys, tmp_path):
    path = _mutate(valid, tmp_path, edit, "legacy")
    o = run_fit(capsys, path, tmp_path / "out", "--mode", "static")
    outcome = check(o, tmp_path / "out", str(path), [message or ""])
    assert outcome == ("fit" if message is None else "error"), o.err


@pytest.mark.slow
def test_damaged_chunk_fails_on_the_worker_in_one_line(valid, client, capsys, tmp_path):
    """An LZF chunk that no longer decompresses is found only when a worker reads it."""
    path = tmp_path / "chunk.hdf"
    shutil.copy(valid["aps-u"], path)
    with h5py.File(path, "r") as f:
        info = f[APSU_MAP_KEYS[1]].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    start = info.byte_offset + info.size // 3
    raw[start : start + 24] = b"\xff" * 24
    path.write_bytes(bytes(raw))
    o = run_fit(capsys, path, tmp_path / "out", "--mode", "static")
    check(o, tmp_path / "out", str(path), ["cannot read the two-time maps"], loading_ok=True)
    assert o.rc == 2 and o.loaded


@pytest.mark.slow
@pytest.mark.parametrize("where, fitted", [((5, 20), True), ((20, 5), False), ((0, 7), False)])
def test_nan_in_fitted_points_only_is_rejected(where, fitted, valid, client, capsys, tmp_path):
    """NaN above the diagonal (in frames 1 … T-1) is rejected; below it, or in frame 0
    (not selected), it is not data the fit uses."""
    path = _mutate(valid, tmp_path, lambda f: f[APSU_MAP_KEYS[1]].__setitem__(where, np.nan))
    o = run_fit(capsys, path, tmp_path / "out", "--mode", "static")
    outcome = check(o, tmp_path / "out", str(path), ["non-finite c2 values above the diagonal at q=0.0055 1/Å, phi=135 deg"], loading_ok=True)
    assert outcome == ("error" if fitted else "fit"), o.err


@pytest.mark.parametrize("frames", [("1", "3"), ("37", "39")])
def test_too_few_frames_rejected_before_the_cluster(frames, valid, capsys, tmp_path):
    o = run_fit(capsys, valid["aps-u"], tmp_path / "out", "--mode", "static", "--frames", *frames)
    check(o, tmp_path / "out", str(valid["aps-u"]), ["frames", "cannot determine"])
    assert o.rc == 3


CONFIG_CASES = [
    ("gap: yes\n", "gap: a boolean is not a number (got True)"),
    ("solver: {max_iterations: true}\n", "solver.max_iterations: a boolean is not a number (got True)"),
    ("tile: '12x'\n", "tile: Input should be a valid integer"),
    ("gap: .nan\n", "gap: Input should be a finite number (got nan)"),
    ("initial: {D0: -.inf}\n", "initial.D0: Input should be a finite number (got -inf)"),
    ("bounds: {D0: [1.0e5, 100]}\n", "bounds.D0: need lower < upper"),
    ("bounds: {offset: [-1.0e308, 1.0e308]}\n", "bounds.offset: need lower < upper and a finite width"),
    ("bounds: {D0: 5}\n", "bounds.D0: Input should be a valid tuple (got 5)"),
    ("initial: [D0, 1]\n", "initial: Input should be a valid dictionary (got ['D0', 1])"),
    ("solver: {maxiter: 5}\n", "solver.maxiter: unknown key (known: max_iterations, ftol, xtol, gtol, qtol, settle_steps)"),
    ("initail: {D0: 1}\n", "initail: unknown key (known: mode, gap"),
    ("mode: static\nmode: laminar_flow\n", "line 2, column 1: not valid YAML (key 'mode' given twice (first on line 1))"),
    ("solver:\n  ftol: 1.0e-8\n  ftol: 1.0e-6\n", "line 3, column 3: not valid YAML (key 'ftol' given twice"),
    ("mode: static\n  gap: 1\n", "line 2, column 6: not valid YAML (mapping values are not allowed here)"),
    ("bounds: {D0: [1, 2\n", "not valid YAML"),
    ("mode: static\x07\n", "line 1, column 13: not valid YAML (character #x07: special characters are not allowed)"),
    ("- mode\n- static\n", "expected a mapping of settings (key: value) at the top level, got list ['mode', 'static']"),
    ("[" * 3000 + "]" * 3000, "not valid YAML"),
    ("", None),
    ("gap: 1e6\ntile: '128'\nsolver: {ftol: '1e-8'}\n", None),
    ("base: &b {D0: 15000}\ninitial:\n  <<: *b\n  D0: 16000\n", "base: unknown key"),
]


@pytest.mark.slow
@pytest.mark.parametrize("text, message", CONFIG_CASES, ids=range(len(CONFIG_CASES)))
def test_config_case(text, message, valid, client, capsys, tmp_path):
    cfg = tmp_path / "case.yaml"
    cfg.write_text(text)
    o = run_fit(capsys, valid["aps-u"], tmp_path / "out", "--config", cfg, "--mode", "static")
    outcome = check(o, tmp_path / "out", str(cfg), [message or ""])
    assert outcome == ("fit" if message is None else "error"), o.err


def test_config_binary_and_options_name_their_source(tmp_path):
    cfg = tmp_path / "binary.yaml"
    cfg.write_bytes(b"mode: static\n\x00\x01\xff\xfe")
    with pytest.raises(ConfigError, match=r"binary.yaml: line 2: not UTF-8 text \(byte 0xff\)"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"^option tile: Input should be greater than or equal to 8 \(got 3\)$"):
        load_config(None, tile=3)
    with pytest.raises(ConfigError, match=r"config = 5: expected a YAML file"):
        load_config(5)
    with pytest.raises(ConfigError, match=r"not a regular file"):
        load_config(tmp_path)
    # the merge key `<<` may be overridden: not a duplicate
    cfg.write_text("initial:\n  <<: {D0: 15000}\n  D0: 16000\n")
    assert load_config(cfg).initial == {"D0": 16000.0}


# --------------------------------------------------------------------------- through a real process


@pytest.mark.slow
def test_one_line_and_exit_code_through_a_subprocess(valid, tmp_path):
    """The same single line and exit code from ``python -m xpcsfit.cli`` (no traceback)."""
    no_bins = _mutate(valid, tmp_path, lambda f: f.__delitem__(apsu.BINS))
    truncated = tmp_path / "truncated.hdf"
    truncated.write_bytes(valid["aps-u"].read_bytes()[:5000])
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("bounds: {D0: [1, 2\n")
    cases = [
        ([no_bins], 2, f"xpcsfit: error: {no_bins}: missing key /xpcs/twotime/processed_bins"),
        ([truncated], 2, f"xpcsfit: error: {truncated}: cannot open as HDF5"),
        ([valid["aps-u"], "--config", syntax], 3, f"xpcsfit: error: {syntax}: line 2, column 1: not valid YAML"),
    ]
    root = str(Path(__file__).resolve().parents[1])  # this checkout's xpcsfit, as in this process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, "-m", "xpcsfit.cli", "fit", *map(str, args), "--out",
                               str(tmp_path / f"out{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
             for i, (args, _, _) in enumerate(cases)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, err, (_, code, start) in zip(procs, errs, cases):
        assert p.returncode == code, err
        assert "Traceback" not in err
        assert len(err.splitlines()) == 1 and err.startswith(start), err


@pytest.mark.slow
def test_reordered_bins_of_a_grid_file_fit(valid, client, capsys, tmp_path):
    """processed_bins reversed on the 2 q × 2 phi file: the file's own assignment, fitted."""
    path = _mutate(valid, tmp_path, _set(apsu.BINS, np.array([4, 3, 2, 1])), "grid")
    o = run_fit(capsys, path, tmp_path / "out", "--mode", "static")
    assert check(o, tmp_path / "out", str(path), [""]) == "fit", o.err


OPTION_CASES = [
    (["--dt", "nan"], "dt = nan: must be a finite number > 0"),
    (["--dt=-inf"], "dt = -inf"),
    (["--dt", "1e300"], "dt = 1e+300: outside 1e-09 .. 100000 s"),
    (["--q", "inf"], "q = inf: must be a finite number"),
    (["--phi", "nan"], "phi = nan: must be a finite number"),
    (["--q-index", "-1"], "q_index = -1: out of range"),
    (["--frames", "30", "12"], "frames = (30, 12)"),
    (["--frames", "1", "40"], "need 1 <= A < B <= 39"),
    (["--gap", "nan"], "option gap: Input should be a finite number (got nan)"),
    (["--gap", "0"], "option gap: Input should be greater than 0 (got 0.0)"),
    (["--tile", "4"], "option tile: Input should be greater than or equal to 8 (got 4)"),
    (["--mode", "shear"], "option mode: Input should be 'static' or 'laminar_flow' (got 'shear')"),
]


@pytest.mark.parametrize("options, message", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_bad_option_value_fails_before_the_cluster(options, message, valid, capsys, tmp_path):
    o = run_fit(capsys, valid["aps-u"], tmp_path / "out", *options)
    check(o, tmp_path / "out", "", [message])
    assert o.rc == 3


@pytest.mark.slow
def test_bounds_that_overflow_the_model_fail_in_one_line(valid, client, capsys, tmp_path):
    """D0 in [1e200, 1e300]: the normal equations are not finite; one line, not a LinAlgError."""
    cfg = tmp_path / "huge.yaml"
    cfg.write_text("mode: static\nbounds: {D0: [1.0e200, 1.0e300]}\n")
    o = run_fit(capsys, valid["aps-u"], tmp_path / "out", "--config", cfg)
    check(o, tmp_path / "out", str(valid["aps-u"]), ["the model is not finite at D0="])
    assert o.rc == 3


# --------------------------------------------------------------------------- a store edited by hand


@pytest.fixture(scope="module")
def valid_store(valid, tmp_path_factory) -> Path:
    from xpcsfit.io.store import ingest

    return ingest(valid["aps-u"], tmp_path_factory.mktemp("store") / "valid.zarr", tile=64, gap=2.0e6).path


STORE_ATTRS = ["dt", "n_frames", "tile", "q_index", "q_grid", "has_map", "L", "source", "sha256", "layout"]


@pytest.mark.slow
@settings(max_examples=15, **SETTINGS)
@given(key=st.sampled_from(STORE_ATTRS), value=GARBAGE, drop=st.booleans())
def test_store_attributes_edited_fit_or_fail_in_one_line(key, value, drop, valid_store, client, capsys):
    """The root attributes of an ingested store replaced by garbage, or removed."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "edited.zarr"
        shutil.copytree(valid_store, store)
        meta = json.loads((store / "zarr.json").read_text())
        if drop:
            meta["attributes"].pop(key)
        else:
            meta["attributes"][key] = value
        (store / "zarr.json").write_text(json.dumps(meta))
        o = run_fit(capsys, store, Path(tmp) / "out", "--mode", "static")
        check(o, Path(tmp) / "out", str(store), [key, "store attributes missing"])
