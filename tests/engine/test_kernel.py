"""The tile kernel on its own: row blocks and padding, cost batches, skipped tiles, and
one compiled variant per tile shape (tests/engine/test_evaluators.py checks the sums
against the dense Jacobian through every evaluator)."""

import numpy as np
import pytest

from xpcsfit.engine.kernel import compiled_variants, tile_block_sums, tile_costs

from problems import FLOW_2Q, STATIC_1Q, STATIC_2Q, L

TWO_Q = [STATIC_2Q, FLOW_2Q]


@pytest.mark.parametrize("problem", TWO_Q, ids=str)
def test_row_blocks_and_padding_equal_dense_jacobian(problem):
    # A 47-frame tile is reduced in 2 blocks of 24 rows (ROW_BLOCK_POINTS), the last padded
    # by one row of zero weight; the 70-frame edge tiles are padded too.
    ne = problem.in_process(tile=47).normal_equations(problem.start)
    jtj, jtr, r = problem.dense_at_start
    d = np.sqrt(np.diag(jtj))
    np.testing.assert_allclose(ne.jtj / np.outer(d, d), jtj / np.outer(d, d), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ne.jtr / d, jtr / d, rtol=0, atol=1e-10 * np.max(np.abs(jtr / d)))
    assert ne.cost == pytest.approx(0.5 * r @ r, rel=1e-12)


@pytest.mark.parametrize("problem", TWO_Q, ids=str)
@pytest.mark.parametrize("tile", [32, 47])
def test_cost_batches_equal_dense_costs(problem, tile):
    ev = problem.in_process(tile=tile)
    xs = np.stack([problem.start * (1 + 0.01 * k) for k in range(6)])  # 2 batches, the last padded
    dense = [0.5 * float(np.sum(np.asarray(problem.residual(x)) ** 2)) for x in xs]
    np.testing.assert_allclose(ev.costs(xs), dense, rtol=1e-12)


def test_tiles_below_diagonal_are_skipped_and_points_counted():
    tiles = STATIC_2Q.tiles(32)
    # 3 × 3 tile grid per q: 6 tiles on or above the diagonal, 2 q.
    assert len(tiles) == 12
    assert sum(t.n_points for t in tiles) == 2 * 3 * 70 * 69 // 2


def test_one_compiled_variant_per_kernel_and_tile_shape():
    problem = STATIC_1Q
    layout, x = problem.layout, problem.start
    tiles = problem.tiles(40)  # a shape no other test uses
    before = compiled_variants()
    for tile in tiles:
        tile_block_sums(tile, x, layout, problem.mode, L)
        tile_costs(tile, np.stack([x] * 3), layout, problem.mode, L)
    assert compiled_variants() - before == 2  # block sums and costs, once each
    tile_block_sums(tiles[0], x * 1.01, layout, problem.mode, L)
    assert compiled_variants() - before == 2
    # The count agrees with JAX's own cache (private API, so checked here only).
    from xpcsfit.engine import kernel

    jitted = (kernel._tile_block_sums, kernel._tile_costs, kernel._tile_model)
    if all(hasattr(f, "_cache_size") for f in jitted):
        assert sum(f._cache_size() for f in jitted) == compiled_variants()
