"""xpcsfit cmc's options and inputs: refused with one line before any work, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import xpcsfit
from xpcsfit.cli import main
from xpcsfit.cmc.driver import cmc
from xpcsfit.cmc.plan import MAX_LEVEL_RELATIVE_SD, check_shards, choose_shards
from xpcsfit.errors import ConfigError, InputError, SamplingError


@pytest.mark.parametrize("kwargs, message", [
    (dict(shards=0), "shards"),
    (dict(samples=0), "samples"),
    (dict(warmup=0), "warmup"),
    (dict(chains=0), "chains"),
    (dict(thin=0), "thin"),
    (dict(samples=2.5), "samples"),
    (dict(combine="average"), "combine: unknown method 'average'"),
    (dict(seed=-1), "seed"),
    (dict(target_accept=1.0), "target_accept"),
    (dict(target_accept=0), "target_accept"),
])
def test_bad_options(flow_small, kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        cmc(flow_small, q_index=8, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def test_from_fit_missing_or_malformed(flow_small, tmp_path):
    with pytest.raises(InputError, match="no such fit file"):
        cmc(flow_small, q_index=8, from_fit=tmp_path / "nope.json", progress=False)
    bad = tmp_path / "fit.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a readable fit.json"):
        cmc(flow_small, from_fit=tmp_path, progress=False)  # a directory means its fit.json
    bad.write_text(json.dumps({"mode": "laminar_flow", "parameters": {"D0": {"value": 1.0}}}))
    with pytest.raises(InputError, match="malformed fit.json .missing key"):
        cmc(flow_small, from_fit=bad, progress=False)
    bad.write_text(json.dumps({"mode": "sheared"}))
    with pytest.raises(InputError, match="malformed fit.json .mode 'sheared' unknown"):
        cmc(flow_small, from_fit=bad, progress=False)


def test_given_shard_count_and_its_limit():
    assert check_shards(250_000, None) is None  # chosen later, from the data
    assert check_shards(250_000, 8) == 8
    with pytest.raises(ConfigError, match="shards: 300 is too many"):
        check_shards(250_000, 300)  # fewer than 1 000 points per shard


def test_default_shard_count_threads_and_information():
    # flow_small's levels on all points (2.6 %, 2.5 %): the data support
    # floor((0.06 / 0.026)^2) = 5 shards
    levels = {"J_window_mean": 0.026, "gamma_dot_window_mean": 0.025}
    assert choose_shards(None, 250_000, levels, 2).n_shards == 2  # no more shards than threads
    wide = choose_shards(None, 250_000, levels, 64)
    assert (wide.n_shards, wide.most_by_information) == (5, 5)  # no more than the data support
    assert max(wide.shard_relative_sd().values()) <= MAX_LEVEL_RELATIVE_SD
    assert wide.warning() is None
    assert choose_shards(None, 250_000, levels, 0).n_shards == 1  # no worker up yet
    assert choose_shards(None, 250_000, {"J_window_mean": float("nan")}, 8).n_shards == 1
    # an undetermined level counts wherever it stands among the others
    for order in ((0.026, float("nan")), (float("nan"), 0.026)):
        assert choose_shards(None, 250_000, dict(zip(levels, order)), 8).n_shards == 1
    given = choose_shards(72, 2_900_000, {"J_window_mean": 0.02, "gamma_dot_window_mean": 0.018}, 2)
    assert given.n_shards == 72 and given.given
    assert "72 shards determine J_window_mean only to 17 % each (at most 9" in given.warning()


def test_positive_amplitude_bounds_required(flow_small):
    with pytest.raises(ConfigError, match="bounds.D0: cmc needs a positive lower bound"):
        cmc(flow_small, q_index=8, gap=2e6, config={"bounds": {"D0": [-1.0, 1e5]}}, progress=False)


def test_cli_parser():
    from xpcsfit.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["cmc", "in.hdf", "--shards", "8", "--warmup", "100", "--samples", "200",
                              "--chains", "3", "--from-fit", "f.json", "--out", "o", "--scheduler",
                              "tcp://h:8786", "--q-index", "8", "--combine", "parametric",
                              "--target-accept", "0.95"])
    assert (args.shards, args.warmup, args.samples, args.chains) == (8, 100, 200, 3)
    assert (args.from_fit, args.out, args.scheduler, args.q_index, args.combine) == (
        "f.json", "o", "tcp://h:8786", [8], "parametric")
    assert args.target_accept == 0.95
    with pytest.raises(SystemExit):
        parser.parse_args(["cmc", "in.hdf", "--combine", "mean"])


@pytest.fixture(scope="module")
def static_fit_json(client, static_file, tmp_path_factory):
    """fit.json of a least-squares fit of ``static_file``."""
    out = tmp_path_factory.mktemp("cmc-options") / "fit"
    xpcsfit.fit(static_file, mode="static", client=client, out=out, progress=False)
    return out / "fit.json"


@pytest.mark.slow
def test_cli_reports_all_shards_failed_in_one_line(client, static_file, static_fit_json, tmp_path,
                                                    monkeypatch, capsys):
    from xpcsfit.cmc import driver  # (xpcsfit.cmc itself is the function)

    def every_shard_fails(cl, specs, points, progress):
        # What _run_shards reports for a shard whose task failed after its retries.
        return [{"index": s.index, "name": s.name, "error": "KilledWorker: worker died 3 times"} for s in specs]

    monkeypatch.setattr(driver, "_run_shards", every_shard_fails)
    out = tmp_path / "cmc"
    code = main(["cmc", str(static_file), "--mode", "static", "--from-fit", str(static_fit_json), "--shards", "2",
                 "--warmup", "10", "--samples", "10", "--scheduler", client.scheduler.address,
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == SamplingError.exit_code == 5
    assert err.strip().splitlines() == [
        "xpcsfit: error: all 2 cmc shards failed; first error: KilledWorker: worker died 3 times"]
    assert not out.exists()  # nothing is left behind


@pytest.mark.slow
def test_from_fit_json_gives_the_fit(static_fit_json):
    """The fit cmc starts from when given fit.json is that fit, value for value."""
    from xpcsfit.cmc.plan import initial_fit

    initial = initial_fit(static_fit_json.parent)
    assert initial.source == str(static_fit_json)
    assert not initial.ran_here
    saved = json.loads(static_fit_json.read_text())
    np.testing.assert_array_equal(initial.result.values,
                                  [saved["parameters"][n]["value"] for n in ("D0", "alpha", "D_offset")])
    np.testing.assert_array_equal(initial.result.contrast, saved["per_angle"]["contrast"])
    assert initial.result.input["frames"] == saved["input"]["frames"]
