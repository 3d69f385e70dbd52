"""The static report of a batch run: one ``index.html``, no server, no scripts.

A row per unit of work (file × q, or a joint fit), from the catalogue's latest attempt
of each (:meth:`xpcsfit.batch.catalogue.Catalogue.latest`): status, input, q, mode, the
quantities the data determine — J(t) and gamma_dot(t) at the start, middle and end of
the fitted window with their 1-sigma bands, phi0 — reduced χ², warnings, the error of a
failed attempt, a link to the fit's directory and its ``transport.png`` as a thumbnail.
Below it, a second table lists the files found but not fitted (not two-time results,
damaged results, bad settings) with their reason, when the run gives them. Links are
relative to the page, so the tree can be served or copied as it is. The page
is written atomically (:func:`xpcsfit.io.atomic.atomic_write_text`): a browser reloading
it during a run sees the previous page or the new one.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

from xpcsfit.batch.catalogue import POINTS, Catalogue, now
from xpcsfit.io.atomic import atomic_write_text

THUMBNAIL = "transport.png"

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.converged td.status { background: #dff0d8; }
tr.not-converged td.status, tr.interrupted td.status, tr.running td.status { background: #fcf8e3; }
tr.failed td.status { background: #f2dede; }
img { width: 180px; }
td.warnings { max-width: 24em; font-size: 0.85em; }
summary { cursor: pointer; white-space: nowrap; }
"""

COLUMNS = ("status", "input", "q index", "q (1/Å)", "mode",
           *(f"J({p}) (Å²/s)" for p in POINTS), *(f"γ̇({p}) (1/s)" for p in POINTS),
           "phi0 (deg)", "reduced χ²", "warnings", "result", "transport")


def write_report(catalogue_path: str | Path, out: str | Path, *, title: str = "xpcsfit batch results",
                 not_fitted=()) -> Path:
    """Write the report of a catalogue to ``out`` (an index.html), atomically.

    Parameters
    ----------
    catalogue_path : str or Path
        The catalogue (``<out-root>/xpcsfit.sqlite``), read on a read-only connection.
    out : str or Path
        The page to write; links and thumbnails are relative to its directory.
    title : str
        Heading and <title> of the page.
    not_fitted : sequence of (path, reason)
        Files of the run that have no fit, each with its one-line reason.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    InputError
        As for :class:`~xpcsfit.batch.catalogue.Catalogue` (missing or foreign file).
    OSError
        The page cannot be written (an earlier page is then unchanged).
    """
    with Catalogue(catalogue_path) as cat:
        rows = cat.latest()
    out = Path(out)
    atomic_write_text(out, render(rows, out.parent.resolve(), title=title, not_fitted=not_fitted))
    return out


def render(rows: list[dict], base: Path, *, title: str, not_fitted=()) -> str:
    """The page for ``rows`` (from :meth:`Catalogue.latest`), links relative to ``base``."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[status_of(row)] = counts.get(status_of(row), 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no fits yet"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "\n".join(_row(row, base) for row in rows)
    others = ""
    if not_fitted:
        lines = "\n".join(f'<tr class="not-fitted">{_cell(_relative(str(p), base))}{_cell(why)}</tr>'
                          for p, why in not_fitted)
        others = (f"<h2>Not fitted ({len(not_fitted)} files)</h2>\n<table class=\"not-fitted\">\n"
                  f"<thead><tr><th>input</th><th>reason</th></tr></thead>\n<tbody>\n{lines}\n</tbody>\n</table>\n")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{len(rows)} fits: {html.escape(summary)}. Written {now()}.</p>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n{others}</body></html>\n"
    )


def status_of(row: dict) -> str:
    """"converged" / "not converged" for a done attempt, else the attempt's status."""
    if row["status"] == "done":
        return "converged" if row.get("converged") else "not converged"
    return row["status"]


def _row(row: dict, base: Path) -> str:
    status = status_of(row)
    done = row["status"] == "done"
    cells = [
        _cell(status + (f": {row['error']}" if row.get("error") else ""), "status"),
        _cell(_relative(row["input"], base)),
        _cell(row["q_index"]),
        _cell(", ".join(f"{q:.4g}" for q in row["q_values"]), "num"),
        _cell(row["mode"]),
    ]
    for key in ("J", "gamma_dot"):
        for p in POINTS:
            cells.append(_cell(_value(row.get(f"{key}_{p}"), row.get(f"{key}_stderr_{p}")) if done else "", "num"))
    cells.append(_cell(_value(row.get("phi0"), row.get("phi0_stderr")) if done else "", "num"))
    cells.append(_cell(_value(row.get("reduced_chi2")) if done else "", "num"))
    warnings = row.get("warnings") or []
    # folded (a fit may carry several long warnings): the table stays readable, a click opens them
    listed = "".join(f"<div>{html.escape(w)}</div>" for w in warnings)
    folded = f"<details><summary>{len(warnings)} warning{'s' * (len(warnings) != 1)}</summary>{listed}</details>"
    cells.append(f'<td class="warnings">{folded if warnings else ""}</td>' if done else "<td></td>")
    result = row.get("result_path") if done else None
    if result:
        href = quote(_relative(result, base))
        cells.append(f'<td><a href="{href}/">{html.escape(Path(result).name)}</a></td>')
        png = Path(result) / THUMBNAIL
        cells.append(f'<td><a href="{href}/{THUMBNAIL}"><img src="{href}/{THUMBNAIL}" alt="J(t) and shear rate"></a></td>'
                     if png.is_file() else "<td></td>")
    else:
        cells += ["<td></td>", "<td></td>"]
    return f'<tr class="{status.replace(" ", "-")}">' + "".join(cells) + "</tr>"


def _cell(text, css: str | None = None) -> str:
    cls = f' class="{css}"' if css else ""
    return f"<td{cls}>{html.escape(str(text))}</td>"


def _value(value, stderr=None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if stderr is None else f"{value:.4g} ± {stderr:.2g}"


def _relative(path: str, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base)).as_posix()
