"""A shard's points: the thinned lattice of every tile, the hash that deals them, the likelihood."""

from __future__ import annotations

import numpy as np
import pytest

import xpcsfit
from xpcsfit.cmc.likelihood import log_likelihood
from xpcsfit.cmc.shard import shard_data, shard_of, tile_lattice
from xpcsfit.engine.tiles import plan_tiles


def test_shard_of_balanced_and_interleaved():
    i, j = np.triu_indices(200, 1)
    k = shard_of(i, j, 4)
    counts = np.bincount(k, minlength=4)
    # A hash is a random-like partition: counts are binomial, sd sqrt(n/4·3/4) ≈ 61 of
    # ~4975; 5 % (≈ 4 sd) is a safe bound.
    np.testing.assert_allclose(counts, i.size / 4, rtol=0.05)
    for shard in range(4):
        lags = set((j - i)[k == shard])
        assert set(range(1, 20)) <= lags  # every short lag in every shard
        assert set(i[k == shard]) >= set(range(190))  # every row (time) in every shard
    np.testing.assert_array_equal(shard_of(i, j, 4), k)  # deterministic


@pytest.fixture(scope="module")
def lattices(static_file):
    ds = xpcsfit.open_dataset(static_file)
    return ds, [tile_lattice(t.load(), 2) for t in plan_tiles(ds, 64)]


def test_lattice_keeps_every_second_frame_above_the_diagonal(lattices):
    ds, pieces = lattices
    c2 = ds["c2"].values
    for p in pieces:
        assert np.all(p["j"] > p["i"])  # fitted points only (t2 > t1)
        # lattice row/column r is dataset index 2r, and its values are those of the map
        np.testing.assert_array_equal(p["y"], c2[p["q_pos"]][:, 2 * p["i"], 2 * p["j"]])
        np.testing.assert_array_equal(p["t1"], ds["t1"].values[2 * p["i"]])
    rows = np.concatenate([p["i"] for p in pieces])
    cols = np.concatenate([p["j"] for p in pieces])
    assert len(set(zip(rows, cols))) == rows.size == 60 * 59 // 2  # frames 1..119 → 60 lattice rows, each once


def test_shards_partition_the_lattice(lattices):
    _, pieces = lattices
    whole = shard_data(pieces, 0, 1, 3)
    assert whole.n_points == 3 * 60 * 59 // 2
    parts = [shard_data(pieces, k, 3, 3) for k in range(3)]
    np.testing.assert_array_equal(sum(p.n for p in parts), whole.n)


def test_likelihood_peaks_at_truth(lattices):
    import jax.numpy as jnp

    _, pieces = lattices
    data = shard_data(pieces, 0, 1, 3)
    var = np.full(3, 1e-4)  # the simulated noise sd 0.01
    truth = jnp.array([1.0e4, -0.6, 5.0e3])
    ll0 = float(log_likelihood(truth, data, var, "static", 2e6))
    for scale in (0.9, 1.1):
        assert float(log_likelihood(truth * jnp.array([scale, 1.0, 1.0]), data, var, "static", 2e6)) < ll0 - 10


def test_padding_to_common_shapes_leaves_every_likelihood_unchanged(lattices):
    """Shards padded to one shape (so a worker compiles once) have the same likelihood:
    the masked points count for nothing."""
    import jax.numpy as jnp

    from xpcsfit.cmc.likelihood import pad_to_common_shapes

    _, pieces = lattices
    parts = [shard_data(pieces, k, 3, 3) for k in range(3)]
    padded = pad_to_common_shapes(parts)
    sizes = {p.groups[0]["t1"].size for p in padded}
    longest = max(p.groups[0]["t1"].size for p in parts)
    assert len(sizes) == 1 and sizes.pop() == longest
    assert any(p.groups[0]["t1"].size < longest for p in parts)  # some shard was padded
    var = np.full(3, 1e-4)
    for theta in ([1.0e4, -0.6, 5.0e3], [2.0e4, 0.1, 1.0e3]):
        theta = jnp.array(theta)
        for raw, pad in zip(parts, padded):
            assert pad.n_points == raw.n_points
            np.testing.assert_allclose(float(log_likelihood(theta, pad, var, "static", 2e6)),
                                       float(log_likelihood(theta, raw, var, "static", 2e6)), rtol=1e-12)
