"""A shard whose data are corrupted is named, with its effect on the combination."""

from __future__ import annotations

import numpy as np
import pytest

from xpcsfit.cmc.driver import cmc
from xpcsfit.cmc.likelihood import ShardData

pytestmark = pytest.mark.slow

BAD = 1  # the shard whose data are corrupted


def corrupt(data: ShardData, seed: int = 0) -> ShardData:
    """data with a block of c2 replaced by noise: every point with both frames in the
    first 60 % of the window becomes the block's mean plus Gaussian noise of the
    data's own sd (a detector that stopped seeing speckle, say). The decay there is
    gone, so the shard sees a slower J(t) than the others."""
    rng = np.random.default_rng(seed)
    groups, syy = [], data.syy.copy()
    for g in data.groups:
        t_cut = g["t1"].min() + 0.6 * (g["t2"].max() - g["t1"].min())
        block = g["t2"] < t_cut
        yc = g["yc"].copy()
        sd = yc.std(axis=1, keepdims=True)
        yc[:, block] = yc[:, block].mean(axis=1, keepdims=True) + rng.normal(size=yc[:, block].shape) * sd
        yc = yc - yc.mean(axis=1, keepdims=True)
        syy[g["bins"]] = (yc * yc).sum(axis=1)
        groups.append(dict(g, yc=yc))
    return ShardData(groups=groups, n=data.n, syy=syy)


def test_a_corrupted_shard_is_named_with_its_effect(client, static_file, monkeypatch):
    from xpcsfit.cmc import driver  # (xpcsfit.cmc itself is the function)

    real = driver.shard_data

    def with_one_bad(pieces, index, n_shards, n_bins):
        data = real(pieces, index, n_shards, n_bins)
        return corrupt(data) if index == BAD else data

    monkeypatch.setattr(driver, "shard_data", with_one_bad)
    r = cmc(static_file, mode="static", shards=4, warmup=300, samples=500, chains=2, client=client,
            progress=False)
    bad = f"shard-{BAD:02d}"
    assert r.summary["shards_failing_diagnostics"] == [bad], [(s["name"], s["problems"]) for s in r.shards]
    entry = r.shards[BAD]
    # Named for what is wrong with it: its sub-posterior is far from the others'
    # (planted: chi-square tail probability far below the 1e-6 alarm limit). Its own
    # sampler may fail too (a first run: R-hat 2.2, the corrupted target is not one
    # the model can fit), but that alone would not say the data are bad ...
    assert entry["consistency"]["p_value"] < 1e-6, entry["consistency"]
    assert any("disagrees with the other shards" in p for p in entry["problems"])
    # ... and the good shards agree with one another (none named).
    for k, s in enumerate(r.shards):
        if k != BAD:
            assert s["consistency"]["p_value"] > 1e-6, s
            assert bad not in s["consistency"]["compared_with"]
    # Its effect on the combination is measured by leaving it out: it moves the
    # combined posterior by more than 1 combined sd somewhere (it carries a quarter of
    # the data, all of them wrong in the block).
    assert entry["effect"]["max_shift_sd"] > 1.0
    assert any(bad in w and "Effect" in w for w in r.warnings)
