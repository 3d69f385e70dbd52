"""The static index.html: a row per fit, parsed back."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from xpcsfit.batch.catalogue import Catalogue
from xpcsfit.batch.report import COLUMNS, write_report
from xpcsfit.leastsq.results import FitResult

pytestmark = pytest.mark.slow  # the rows come from the session's two small fits on a LocalCluster


class Table(HTMLParser):
    """The body rows of the page: per row its class, cell texts, links and images."""

    def __init__(self):
        super().__init__()
        self.rows, self.header, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append({"class": attrs.get("class"), "cells": [], "links": [], "images": []})
        elif tag in ("td", "th"):
            self._in = tag
            (self.header if tag == "th" else self.rows[-1]["cells"]).append("")
        elif tag == "a":
            self.rows[-1]["links"].append(attrs["href"])
        elif tag == "img":
            self.rows[-1]["images"].append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in = None

    def handle_data(self, data):
        if self._in == "th":
            self.header[-1] += data
        elif self._in == "td":
            self.rows[-1]["cells"][-1] += data


def parse(path):
    table = Table()
    table.feed(path.read_text(encoding="utf-8"))
    return table.header, [r for r in table.rows if r["cells"]]


@pytest.fixture(scope="module")
def page(fitted, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("report")
    data = out_root / "data"
    data.mkdir()
    laminar = FitResult.from_json(fitted["laminar_flow"] / "fit.json")
    with Catalogue(out_root / "xpcsfit.sqlite", write=True) as cat:
        unit = dict(sha256="0" * 64, q=[0.0055], mode="laminar_flow", fingerprint="f")
        a = cat.begin(input=data / "a <b>.hdf", q_index=[0], **unit)
        cat.finish(a, laminar, fitted["laminar_flow"])
        b = cat.begin(input=data / "b.hdf", q_index=[0], **unit)
        cat.fail(b, "b.hdf: /xpcs/qmap/dynamic_v_list_dim0: missing key")
        cat.begin(input=data / "c.hdf", q_index=[1], **unit)
    # a reopened writer marks c's attempt interrupted, as after a killed run
    Catalogue(out_root / "xpcsfit.sqlite", write=True).close()
    path = write_report(out_root / "xpcsfit.sqlite", out_root / "index.html")
    return path, laminar, fitted["laminar_flow"]


def test_a_row_per_fit_with_status_values_links(page):
    path, r, result_dir = page
    header, rows = parse(path)
    assert header == list(COLUMNS)
    assert [row["class"] for row in rows] == ["converged", "failed", "interrupted"]
    done = dict(zip(header, rows[0]["cells"]))
    assert done["status"] == "converged" and done["input"] == "data/a <b>.hdf" and done["mode"] == "laminar_flow"
    t = r.transport["t"]
    value, band = done["J(start) (Å²/s)"].split(" ± ")
    assert float(value) == pytest.approx(r.J(t[0]), rel=1e-3)
    assert float(band) == pytest.approx(r.transport["J_stderr"][0], rel=1e-1)
    assert float(done["γ̇(end) (1/s)"].split(" ± ")[0]) == pytest.approx(r.gamma_dot(t[-1]), rel=1e-3)
    assert float(done["reduced χ²"]) == pytest.approx(r.reduced_chi2, rel=1e-3)
    assert all(w in done["warnings"] for w in r.warnings)
    import os
    rel = os.path.relpath(result_dir, path.parent)
    assert rows[0]["links"][0] == f"{rel}/" and rows[0]["images"] == [f"{rel}/transport.png"]
    assert (path.parent / rows[0]["images"][0]).is_file()
    failed = dict(zip(header, rows[1]["cells"]))
    assert failed["status"] == "failed: b.hdf: /xpcs/qmap/dynamic_v_list_dim0: missing key"
    assert failed["J(start) (Å²/s)"] == "" and rows[1]["links"] == [] and rows[1]["images"] == []


def test_page_is_escaped_and_rewritten_whole(page):
    path, _, _ = page
    text = path.read_text(encoding="utf-8")
    assert "a &lt;b&gt;.hdf" in text and "<b>" not in text
    assert "3 fits: 1 converged, 1 failed, 1 interrupted" in text
    assert not list(path.parent.glob("index.html.tmp-*"))
