"""Block-arrow normal equations equal the dense ones (DESIGN.md §5)."""

import numpy as np
import pytest

from helpers import dense_jacobian, dense_residual, in_process, start, synthetic_dataset


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
@pytest.mark.parametrize("tile", [32, 47])
def test_block_normal_equations_equal_dense_jacobian(mode, tile):
    # 2 q × 3 phi × 70 frames: edge tiles padded, lower tiles skipped. A 32-frame tile is
    # reduced as one row block; a 47-frame tile in 2 blocks of 24 rows (ROW_BLOCK_POINTS),
    # the last padded by one row of zero weight.
    ds = synthetic_dataset(mode)
    ev, layout = in_process(ds, mode, tile=tile)
    x = start(layout, mode)
    residual = dense_residual(ds, mode, layout)
    J = dense_jacobian(residual, x)
    r = np.asarray(residual(x))
    ne = ev.normal_equations(x)
    jtj, jtr = J.T @ J, J.T @ r
    # Relative to each entry's own scale sqrt(JᵀJ_ii JᵀJ_jj): the columns differ by 1e12.
    d = np.sqrt(np.diag(jtj))
    np.testing.assert_allclose(ne.jtj / np.outer(d, d), jtj / np.outer(d, d), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ne.jtr / d, jtr / d, rtol=0, atol=1e-10 * np.max(np.abs(jtr / d)))
    assert ne.cost == pytest.approx(0.5 * r @ r, rel=1e-12)
    assert ne.n == r.size


@pytest.mark.parametrize("mode", ["static", "laminar_flow"])
@pytest.mark.parametrize("tile", [32, 47])
def test_cost_pass_matches_normal_equation_cost(mode, tile):
    # 47 rows of 47 points split into 2 row blocks of 24, the last padded by one row
    ds = synthetic_dataset(mode)
    ev, layout = in_process(ds, mode, tile=tile)
    x0 = start(layout, mode)
    xs = np.stack([x0 * (1 + 0.01 * k) for k in range(6)])  # more than one cost batch
    costs = ev.costs(xs)
    expected = [ev.normal_equations(x).cost for x in xs]
    np.testing.assert_allclose(costs, expected, rtol=1e-12)


def test_tiles_below_diagonal_are_skipped_and_points_counted():
    ds = synthetic_dataset("static", n_t=70)
    ev, layout = in_process(ds, "static", tile=32)
    # 3 × 3 tile grid per q: 6 tiles on or above the diagonal, 2 q.
    assert len(ev.tiles) == 12
    assert sum(t.n_points for t in ev.tiles) == 2 * 3 * 70 * 69 // 2


@pytest.mark.parametrize("n_workers", [1, 2, 3, 7, 50])
def test_parts_are_subtrees_so_sums_do_not_depend_on_workers(n_workers):
    from xpcsfit.engine.evaluator import part_size, tree_sum

    rng = np.random.default_rng(0)
    values = [rng.normal(size=5) * 10.0 ** rng.integers(-8, 8) for _ in range(613)]
    size = part_size(len(values), n_workers)
    parts = [tree_sum(values[i : i + size]) for i in range(0, len(values), size)]
    assert len(parts) >= min(n_workers, len(values))
    assert np.array_equal(tree_sum(parts), tree_sum(values))  # bit for bit
