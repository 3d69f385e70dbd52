"""The evaluators — in process, and Dask on 1 and on 2 workers — through the same
problems (tests/problems.py): the block-arrow normal equations equal the dense
Jacobian's, costs equal the dense residual's and scipy's at its solution, lag sums equal
the diagonal sums of the maps, and the sums do not depend on the number of workers, bit
for bit."""

import dataclasses

import numpy as np
import pytest

from xpcsfit.engine.evaluator import DaskEvaluator
from xpcsfit.engine.parts import part_size, tree_sum

from problems import PROBLEMS, L

EVALUATORS = [
    "in-process",
    pytest.param("dask-1-worker", marks=pytest.mark.slow),
    pytest.param("dask-2-workers", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def one_worker():
    """A 1-worker LocalCluster beside the session's 2-worker one (not the default client)."""
    from distributed import Client

    from xpcsfit.engine.cluster import local_cluster

    with local_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        yield c


def dask_evaluator(client, problem):
    return DaskEvaluator(client, problem.specs(), problem.layout, problem.mode, L, storage="hold")


@pytest.fixture(params=EVALUATORS)
def evaluator_of(request):
    """``make(problem)``: an evaluator of this test's kind over the problem's tiles."""
    made = []

    def make(problem):
        if request.param == "in-process":
            ev = problem.in_process()
        else:
            name = "one_worker" if request.param == "dask-1-worker" else "client"
            ev = dask_evaluator(request.getfixturevalue(name), problem)
        made.append(ev)
        return ev

    yield make
    for ev in made:
        ev.close()


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_normal_equations_equal_dense_jacobian(evaluator_of, problem):
    ev = evaluator_of(problem)
    jtj, jtr, r = problem.dense_at_start
    ne = ev.normal_equations(problem.start)
    # Relative to each entry's own scale sqrt(JᵀJ_ii JᵀJ_jj): the columns differ by 1e12.
    d = np.sqrt(np.diag(jtj))
    np.testing.assert_allclose(ne.jtj / np.outer(d, d), jtj / np.outer(d, d), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ne.jtr / d, jtr / d, rtol=0, atol=1e-10 * np.max(np.abs(jtr / d)))
    assert ne.cost == pytest.approx(0.5 * r @ r, rel=1e-12)
    assert ne.n == r.size


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_costs_equal_dense_and_scipy_at_its_solution(evaluator_of, problem):
    ref = problem.scipy_solution
    ev = evaluator_of(problem)
    # 5 points: more than one cost batch (COST_BATCH = 4), the last one padded.
    xs = np.stack([ref.x, problem.start] + [ref.x * (1 + 1e-3 * k) for k in (1, 2, 3)])
    costs = ev.costs(xs)
    dense = [0.5 * float(np.sum(np.asarray(problem.residual(x)) ** 2)) for x in xs]
    np.testing.assert_allclose(costs, dense, rtol=1e-12)
    assert costs[0] == pytest.approx(ref.cost, rel=1e-12)
    assert ev.normal_equations(ref.x).cost == pytest.approx(ref.cost, rel=1e-12)
    assert (ev.normal_passes, ev.cost_passes) == (1, 1)


@pytest.mark.parametrize("problem", PROBLEMS[:2], ids=str)
def test_lag_sums_equal_diagonal_sums(evaluator_of, problem):
    ev = evaluator_of(problem)
    n_t = problem.n_t
    sums, counts = ev.lag_sums(n_t)
    c2 = problem.dataset["c2"].values.astype(float).reshape(-1, n_t, n_t)  # bins (q, phi) row-major
    for b in range(problem.layout.n_bins):
        for lag in range(n_t):
            diagonal = np.diagonal(c2[b], offset=lag)
            fitted = lag > 0  # the diagonal (lag 0) is not fitted
            assert counts[b, lag] == (diagonal.size if fitted else 0)
            assert sums[b, lag] == pytest.approx(diagonal.sum() if fitted else 0.0, rel=1e-12)
    assert ev.other_passes == 1


@pytest.mark.slow
@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_sums_do_not_depend_on_the_number_of_workers(problem, client, one_worker):
    x = problem.start
    xs = np.stack([x, x * 1.01])
    runs = []
    for c in (one_worker, client):
        ev = dask_evaluator(c, problem)
        try:
            runs.append((len(ev.parts), ev.block_sums(x), ev.costs(xs), ev.lag_sums(problem.n_t)))
        finally:
            ev.close()
    (parts_1, sums_1, costs_1, lags_1), (parts_2, sums_2, costs_2, lags_2) = runs
    assert parts_1 < parts_2  # the tiles are grouped differently, the sums are the same
    for f in dataclasses.fields(sums_1):
        assert np.array_equal(getattr(sums_1, f.name), getattr(sums_2, f.name)), f.name
    assert np.array_equal(costs_1, costs_2)
    assert all(np.array_equal(a, b) for a, b in zip(lags_1, lags_2))


@pytest.mark.parametrize("n_workers", [1, 2, 3, 7, 50])
def test_parts_are_subtrees_so_sums_do_not_depend_on_workers(n_workers):
    rng = np.random.default_rng(0)
    values = [rng.normal(size=5) * 10.0 ** rng.integers(-8, 8) for _ in range(613)]
    size = part_size(len(values), n_workers)
    parts = [tree_sum(values[i : i + size]) for i in range(0, len(values), size)]
    assert len(parts) >= min(n_workers, len(values))
    assert np.array_equal(tree_sum(parts), tree_sum(values))  # bit for bit
