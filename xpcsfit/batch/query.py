"""``xpcsfit results``: the current results of a catalogue as a table, CSV or JSON.

``table`` shows the columns a reader scans first (:data:`TABLE_COLUMNS`: which fit,
whether it converged, reduced χ², J and gamma_dot at the window's start and end,
warnings); ``csv`` and ``json`` hold every column of the ``results`` table
(:mod:`xpcsfit.batch.catalogue`), lists (warnings, q_values) as JSON in CSV.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from xpcsfit.batch.catalogue import Catalogue
from xpcsfit.errors import ConfigError

FORMATS = ("table", "csv", "json")
TABLE_COLUMNS = ("input", "q_index", "mode", "converged", "reduced_chi2",
                 "J_start", "J_end", "gamma_dot_start", "gamma_dot_end", "n_warnings")


def results_text(path: str | Path, where: str | None = None, fmt: str = "table") -> str:
    """The current results of the catalogue ``path`` in format ``fmt``.

    Parameters
    ----------
    path : str or Path
        The catalogue file.
    where : str, optional
        SQL condition over the columns of ``results`` (e.g. ``"converged AND q > 0.005"``).
    fmt : {"table", "csv", "json"}

    Returns
    -------
    str
        Ending with a newline; a table of no rows says so in one line.

    Raises
    ------
    ConfigError
        Unknown format, or a ``where`` that is not a valid condition.
    InputError
        No such catalogue, or not one (see :class:`Catalogue`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    with Catalogue(path) as cat:
        rows, columns = cat.results(where), cat.columns("results")
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([json.dumps(row[c]) if isinstance(row[c], list) else row[c] for c in columns])
        return out.getvalue()
    return table(rows)


def table(rows: list[dict]) -> str:
    """:data:`TABLE_COLUMNS` of ``rows`` as aligned text (the input by file name)."""
    if not rows:
        return "no results\n"
    cells = [[_text(c, row[c]) for c in TABLE_COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def _text(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "input":
        return Path(value).name
    if column == "converged":
        return "yes" if value else "no"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
