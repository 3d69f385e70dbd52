"""What the Dask dashboard shows of a fit: its span (input and q) with one span per
solver iteration, and task keys whose prefixes name the pass (xpcsfit.engine.spans).

Read through the scheduler (its spans extension, the task stream) and through the
dashboard's own pages on 127.0.0.1: the span filter of "Fine Performance Metrics" and
the task stream's bars, pulled from the dashboard's Bokeh server as a browser would
get them (HTTP and its websocket, bokeh.client), without a browser.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
import warnings

import pytest
from dask.utils import key_split
from distributed.utils import key_split_group

import xpcsfit
from xpcsfit.engine.spans import new_token, span_label, task_kind, task_name

LABEL = "small_flow.hdf q=0.0055"  # the small_flow_file fixture: 1 q, 0.0055 1/Å
KINDS = ["load", "lag-sums", "normal-equations", "costs", "covariance", "write-outputs", "noise-lattice", "cmc-shard"]


# -- task names, without a cluster ---------------------------------------------------


@pytest.mark.parametrize("token", ["12345678", "abcdefab", "a1b2c3d4", "0000beef", "deadbeef"])
def test_task_names_group_by_pass_kind_in_the_task_stream(token):
    for kind in KINDS:
        name = task_name(kind, token, 12)
        assert name == f"xpcsfit-{kind}-{token}-pass-12"
        key = (name, 3)  # part 3 of pass 12
        assert key_split(key) == f"xpcsfit-{kind}"  # the task stream's label and colour
        assert key_split_group(key) == name  # the scheduler's task group: this fit's pass
        assert task_kind(key) == kind
        assert key_split((task_name(kind, token), 0)) == f"xpcsfit-{kind}"
    # the tokens xpcsfit draws never join the prefix (8 letters a-f would, were they not hex)
    for _ in range(2000):
        assert key_split((task_name("normal-equations", new_token(), 7), 0)) == "xpcsfit-normal-equations"
    assert task_kind("fit-0a1b2c3d4e5f") is None and task_kind(("xpcsfitx-load-1", 0)) is None
    with pytest.raises(ValueError, match="lower-case words"):
        task_name("normal_equations", token)


def test_span_label_names_the_file_and_q():
    assert span_label("/data/run42/flow_small.hdf", [0.0055548]) == "flow_small.hdf q=0.005555"
    assert span_label("store.zarr/", 0.0055) == "store.zarr q=0.0055"
    assert span_label("run.hdf", [0.0054, 0.0081, 0.0061]) == "run.hdf q=0.0054…0.0081 (3 q)"


# -- a fit on a LocalCluster with its dashboard --------------------------------------


@pytest.fixture(scope="module")
def dashboard():
    """A 2-worker LocalCluster of xpcsfit's, its dashboard on 127.0.0.1 (8787, or a free
    port when that is taken); not the session's default client."""
    from distributed import Client

    from xpcsfit.engine.cluster import local_cluster

    with local_cluster(2) as cluster, Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2)
        yield c


def spans_named(client, name: tuple) -> list[dict]:
    """Every span of ``name`` on the scheduler, oldest first: the task groups directly in
    it, and per child (oldest first) its last tag, its task groups and its children's
    last tags."""

    def read(name, dask_scheduler=None):
        ext = dask_scheduler.extensions["spans"]

        def groups(span):
            return sorted(tg.name for tg in span.groups)

        return [{"id": s.id, "groups": groups(s),
                 "children": [(c.name[-1], groups(c), [g.name[-1] for g in c.children]) for c in s.children]}
                for s in ext.spans.values() if s.name == tuple(name)]

    return client.run_on_scheduler(read, name)


@contextlib.contextmanager
def pulled(url: str):
    """The Bokeh document of a dashboard page, as its server sends it to a browser."""
    from bokeh.client import pull_session

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is no current event loop", DeprecationWarning)  # tornado
        with pull_session(url=url) as session:
            yield session


def kinds(groups: list[str]) -> list[str]:
    return sorted({task_kind((g, 0)) for g in groups})


def newest(client, name: tuple) -> dict:
    found = spans_named(client, name)
    assert found, f"no span {name}"
    return found[-1]


def check_fit_spans(span: dict, result, written: bool) -> None:
    """``span`` (of :func:`spans_named`) holds the fit's phases, an iteration span each,
    and the fit's passes, each in its phase."""
    assert span["groups"] == []  # every task is in one of its phases
    children = {tag: (kinds(groups), groups, grandchildren) for tag, groups, grandchildren in span["children"]}
    n = result.iterations
    iterations = [f"iteration {i}" for i in range(1, n + 1)]
    expected = ["load tiles", "start values", *iterations, "covariance"] + (["write outputs"] if written else [])
    assert [tag for tag, *_ in span["children"]] == expected
    assert children["load tiles"][0] == ["load"]
    assert children["start values"][0] == ["lag-sums", "normal-equations"]
    # Each accepted step: its trial cost passes, then normal equations. (A last step that
    # found no better point would add one more iteration span, of cost passes only.)
    for it in iterations:
        assert children[it][0] == ["costs", "normal-equations"], it
    assert children["covariance"][0] == ["covariance"]  # the correlated-noise inflation's one pass
    if written:
        assert children["write outputs"][0] == ["write-outputs"]
    groups = [name for _, names, _ in children.values() for name in names]
    assert sum(task_kind((g, 0)) == "costs" for g in groups) == result.engine["cost_passes"]
    assert sum(task_kind((g, 0)) == "normal-equations" for g in groups) == result.engine["normal_passes"]
    assert all(not grandchildren for *_, grandchildren in children.values())


@pytest.fixture(scope="module")
def fitted(dashboard, small_flow_file, tmp_path_factory):
    """A fit with outputs on the dashboard's cluster: (its result, its tasks' keys in the
    task stream)."""
    from distributed import get_task_stream

    out = tmp_path_factory.mktemp("dashboard") / "fit"
    with get_task_stream(dashboard) as stream:
        result = xpcsfit.fit(small_flow_file, gap=2.0e6, client=dashboard, out=out, progress=False)
    assert result.iterations >= 2
    return result, [t["key"] for t in stream.data]


@pytest.mark.slow
def test_fit_runs_in_its_span_with_one_span_per_iteration(dashboard, fitted):
    result, _ = fitted
    check_fit_spans(newest(dashboard, ("xpcsfit fit", LABEL)), result, written=True)


@pytest.mark.slow
def test_task_stream_has_one_prefix_per_kind_of_pass(fitted):
    # One prefix (colour) per kind of pass; each pass has one task per part, numbered in
    # order over the fit's passes (lag sums first, outputs last).
    result, keys = fitted
    engine = result.engine
    by_kind = {}
    for k in keys:
        by_kind.setdefault(key_split(k), set()).add(k)
    assert {kind: len(ks) for kind, ks in by_kind.items()} == {
        "xpcsfit-load": engine["n_parts"],
        "xpcsfit-lag-sums": engine["n_parts"],
        "xpcsfit-normal-equations": engine["normal_passes"] * engine["n_parts"],
        "xpcsfit-costs": engine["cost_passes"] * engine["n_parts"],
        "xpcsfit-covariance": engine["n_parts"],
        "xpcsfit-write-outputs": engine["n_parts"],
    }
    passes = sorted({int(name.rsplit("-pass-", 1)[1]) for name, _ in keys if "-pass-" in name})
    assert passes == list(range(1, engine["normal_passes"] + engine["cost_passes"] + 4))
    assert {part for _, part in keys} == set(range(engine["n_parts"]))


@pytest.mark.slow
def test_dashboard_pages_show_the_fit_spans_and_prefixes(dashboard, fitted):
    # The dashboard, on 127.0.0.1, serves these names: the span filter of its span view
    # and the bars of its task stream.
    pytest.importorskip("bokeh", reason="the dashboard's pages need Bokeh (the dashboard extra)")
    from bokeh.models import ColumnDataSource, MultiChoice

    result, keys = fitted
    port = dashboard.scheduler_info()["services"]["dashboard"]
    assert dashboard.dashboard_link.startswith("http://127.0.0.1:")
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/individual-fine-performance-metrics", timeout=10) as page:
        assert page.status == 200 and b"bokeh" in page.read().lower()
    with pulled(f"{base}/individual-fine-performance-metrics") as session:
        (tags,) = [m.options for m in session.document.select({"type": MultiChoice}) if "span tag" in m.title]
    iterations = {f"iteration {i}" for i in range(1, result.iterations + 1)}
    assert {"xpcsfit fit", LABEL, "load tiles", "start values", "write outputs"} | iterations <= set(tags)
    with pulled(f"{base}/individual-task-stream") as session:
        (bars,) = [m.data for m in session.document.select({"type": ColumnDataSource}) if "name" in m.data]
    assert {key_split(k) for k in keys} <= set(bars["name"])
    print(f"\n{result.iterations} iterations; span tags {sorted(tags)}; task stream {sorted(set(bars['name']))}")


@pytest.mark.slow
def test_a_fit_submitted_as_a_task_has_its_spans_below_the_tasks(dashboard, small_flow_file):
    from distributed import span

    # Fits running as tasks (they fan out from the worker through worker_client) open
    # the same spans; the tasks themselves are in the default span. Two at once on one
    # cluster: each fit's passes are in its own spans (one task group per fit and pass).
    futures = [dashboard.submit(xpcsfit.fit, str(small_flow_file), gap=2.0e6, progress=False, pure=False)
               for _ in range(2)]
    results = dashboard.gather(futures)
    assert results[0].x.tolist() == results[1].x.tolist()
    for fit_span in spans_named(dashboard, ("xpcsfit fit", LABEL))[-2:]:
        check_fit_spans(fit_span, results[0], written=False)
    # Dask puts a whole task group in one span: while these "fit-<uuid>" tasks are known
    # to the scheduler, the next one (same group "fit") would be put in the default span too.
    keys = [f.key for f in futures]
    del futures
    deadline = time.monotonic() + 10
    while dashboard.run_on_scheduler(lambda dask_scheduler: any(k in dask_scheduler.tasks for k in keys)):
        assert time.monotonic() < deadline, f"the scheduler still holds {keys}"
        time.sleep(0.05)

    # Submitted inside a span of the user's, the fit's spans are below it.
    with span("night run"):
        future = dashboard.submit(xpcsfit.fit, str(small_flow_file), gap=2.0e6, progress=False, pure=False)
    result = future.result()
    check_fit_spans(newest(dashboard, ("night run", "xpcsfit fit", LABEL)), result, written=False)


@pytest.mark.slow
def test_cmc_runs_in_its_span_with_the_fit_noise_pass_and_shards(dashboard, small_flow_file):
    from distributed import get_task_stream

    with get_task_stream(dashboard) as stream:
        r = xpcsfit.cmc(small_flow_file, mode="static", gap=2.0e6, shards=2, warmup=10, samples=10, chains=1,
                        thin=4, client=dashboard, progress=False)
    (run,) = spans_named(dashboard, ("xpcsfit cmc", LABEL))[-1:]
    assert [tag for tag, *_ in run["children"]] == ["xpcsfit fit", "noise pass", "shards"]
    children = {tag: (groups, grandchildren) for tag, groups, grandchildren in run["children"]}
    assert children["xpcsfit fit"] == ([], [LABEL])  # the least-squares fit, in its own span
    assert children["noise pass"][1] == ["load tiles"]
    assert kinds(children["noise pass"][0]) == ["noise-lattice"]
    assert kinds(children["shards"][0]) == ["cmc-shard"] and children["shards"][1] == []
    shards = {k for k in (t["key"] for t in stream.data) if task_kind(k) == "cmc-shard"}
    assert {part for _, part in shards} == {0, 1} and len(r.shard_names) == 2
