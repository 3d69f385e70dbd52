"""``fit(in_process=...)``: the whole fit in this process (or inside one Dask task) gives
the parameters of the cluster path, bit for bit."""

import warnings

import numpy as np
import pytest
from data_paths import FLOW

import xpcsfit
from xpcsfit.errors import ConfigError
from xpcsfit.leastsq.placement import IN_PROCESS_MAX_POINTS, choose_in_process

pytestmark = pytest.mark.slow


def fit_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xpcsfit.GapWarning)
        return xpcsfit.fit(*args, progress=False, **kwargs)


def assert_identical(a, b):
    # Bit for bit, not within a tolerance: both paths run the same kernels on the same
    # tiles and add the per-tile sums over the same fixed tree (the Dask parts are
    # aligned subtrees of it), so the solver sees the same numbers at every step.
    assert np.array_equal(a.x, b.x)
    assert a.chi2 == b.chi2
    assert np.array_equal(a.covariance, b.covariance)
    assert (a.termination, a.iterations, a.data_passes) == (b.termination, b.iterations, b.data_passes)


def test_in_process_equals_cluster_and_one_task_on_flow_small(client, tmp_path):
    from distributed import get_task_stream

    selection = dict(q_index=8, mode="laminar_flow", gap=2.0e6)
    on_cluster = fit_quiet(FLOW, **selection, client=client, in_process=False, out=tmp_path / "cluster")
    here = fit_quiet(FLOW, **selection, in_process=True, out=tmp_path / "here")
    assert_identical(here, on_cluster)
    assert here.provenance["cluster"] == "in process"
    assert on_cluster.provenance["cluster"].endswith("(2 workers)")
    assert here.engine["n_parts"] == 1 and here.engine["bytes_to_workers_per_pass"] == 0
    # The same result directory, entry by entry.
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cluster").iterdir())

    # Submitted as a task with in_process=True: the whole fit is that one task.
    with get_task_stream(client) as stream:
        in_task = client.submit(fit_quiet, FLOW, **selection, in_process=True, pure=False).result()
    keys = [t["key"] for t in stream.data]
    assert len(keys) == 1 and str(keys[0]).startswith("fit_quiet-"), keys
    assert_identical(in_task, on_cluster)
    assert in_task.provenance["cluster"] == "in process"


def test_choice_of_in_process(client):
    # ``client`` is this process's default client: auto then runs on it.
    assert choose_in_process(None, 10) == (False, "on the process's default Dask client")
    assert choose_in_process(None, 10, scheduler="tcp://x:1")[0] is False
    assert choose_in_process(False, 10)[0] is False
    assert choose_in_process(True, IN_PROCESS_MAX_POINTS * 100)[0] is True
    with pytest.raises(ConfigError, match="in_process=True and a client"):
        choose_in_process(True, 10, client=client)
    with pytest.raises(ConfigError, match="in_process='yes'"):
        choose_in_process("yes", 10)
    # Inside a worker task, auto uses the worker's cluster (in_process=True opts in).
    where = client.submit(choose_in_process, None, 10, pure=False).result()
    assert where[0] is False and "task" in where[1]
