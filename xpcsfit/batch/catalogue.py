"""The results catalogue of batch runs: one SQLite file, written by the batch driver only.

Tables (schema :data:`SCHEMA_VERSION`, kept in ``PRAGMA user_version``):

``attempts``, one row per fit attempt
    id, input (absolute path), sha256, q_index (text: "8", or "3,8" for a joint fit),
    q (1/Å; NULL for a joint fit), q_values (JSON list), mode, fingerprint,
    status ("running", "done", "failed", "interrupted"), error (one line), started_at,
    ended_at (ISO 8601 UTC), wall_time_s, result_path.
``results``, the current result of each unit (input, q_index), from its last done attempt
    attempt (its id), input, q_index, q, q_values, sha256, fingerprint, mode; for each
    physics parameter of laminar_flow (:data:`PARAMETERS`) ``<name>`` and
    ``<name>_stderr`` in its unit (NULL where the mode has no such parameter or it is
    not determined); t_start, t_middle, t_end (s: the fitted window's first and last
    time and their midpoint) and J_, J_stderr_, gamma_dot_, gamma_dot_stderr_ at each
    (``J_start``, ``J_stderr_start``, …; Å²/s and 1/s, 1-sigma, gamma_dot NULL in static
    mode); chi2, reduced_chi2, dof, converged (0/1), termination, warnings (JSON list),
    n_warnings, result_path, wall_time_s, ended_at.
``hashes``, the sha256 of each input file seen (schema 2)
    path, size, mtime_ns, sha256: a file whose size and mtime_ns are unchanged is not
    read again (:meth:`Catalogue.sha256`), so a nightly run over a large tree reads only
    the files that changed.

Writing: :class:`Catalogue` opened for writing holds an exclusive lock on
``<file>.lock`` (one writer), puts the file in WAL mode (readers never block it nor it
them) and marks attempts left ``running`` by a killed writer as ``interrupted``.
Every change is one transaction: a kill at any moment leaves the last complete state.
Opening an older schema migrates it (:data:`MIGRATIONS`) in one transaction.

Reading: :meth:`Catalogue.results` / :meth:`~Catalogue.attempts` / :meth:`~Catalogue.latest`
(with an optional SQL ``where`` expression, on a read-only connection), and
:func:`catalogue`, a pandas DataFrame of the current results.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from xpcsfit.errors import ConfigError, InputError, XpcsfitError
from xpcsfit.io.hdf5 import sha256_file
from xpcsfit.io.lockfile import LockHeld, release_lock, take_lock
from xpcsfit.leastsq.results import FitResult, transport_bands
from xpcsfit.parameters import MODES

PARAMETERS = MODES["laminar_flow"]
POINTS = ("start", "middle", "end")
STATUSES = ("running", "done", "failed", "interrupted")

_TRANSPORT_COLUMNS = [f"{name}_{p}" for p in POINTS for name in ("J", "J_stderr", "gamma_dot", "gamma_dot_stderr")]

_SCHEMA_1 = f"""
CREATE TABLE attempts (
    id INTEGER PRIMARY KEY,
    input TEXT NOT NULL, sha256 TEXT, q_index TEXT NOT NULL, q REAL, q_values TEXT NOT NULL,
    mode TEXT NOT NULL, fingerprint TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    error TEXT, started_at TEXT NOT NULL, ended_at TEXT, wall_time_s REAL, result_path TEXT
);
CREATE INDEX attempts_unit ON attempts (input, q_index);
CREATE TABLE results (
    input TEXT NOT NULL, q_index TEXT NOT NULL, attempt INTEGER NOT NULL REFERENCES attempts (id),
    q REAL, q_values TEXT NOT NULL, sha256 TEXT, fingerprint TEXT NOT NULL, mode TEXT NOT NULL,
    {", ".join(f"{n} REAL, {n}_stderr REAL" for n in PARAMETERS)},
    t_start REAL, t_middle REAL, t_end REAL,
    {", ".join(f"{c} REAL" for c in _TRANSPORT_COLUMNS)},
    chi2 REAL, reduced_chi2 REAL, dof INTEGER, converged INTEGER NOT NULL, termination TEXT,
    warnings TEXT NOT NULL, n_warnings INTEGER NOT NULL, result_path TEXT,
    wall_time_s REAL, ended_at TEXT,
    PRIMARY KEY (input, q_index)
);
"""

_SCHEMA_2 = """
CREATE TABLE hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
"""

# MIGRATIONS[n] takes a catalogue at schema n - 1 to schema n (0: an empty file).
MIGRATIONS: dict[int, str] = {1: _SCHEMA_1, 2: _SCHEMA_2}
SCHEMA_VERSION = max(MIGRATIONS)


def now() -> str:
    """The current UTC time, ISO 8601 with milliseconds: ``2026-12-02T01:56:05.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Catalogue:
    """A results catalogue, open for reading or (by the one batch driver) for writing.

    Parameters
    ----------
    path : str or Path
        The SQLite file; created (with its directory) when writing and missing.
    write : bool
        Open for writing: take the writer's lock, migrate, mark stale attempts.

    Raises
    ------
    InputError
        Reading a missing file; a file that is not a SQLite database; a catalogue of a
        newer schema than this xpcsfit reads; reading a catalogue of an older schema
        (a writer migrates it).
    XpcsfitError
        Writing while another process holds the writer's lock.
    """

    def __init__(self, path: str | Path, *, write: bool = False):
        self.path = Path(path)
        self.write = bool(write)
        self._lock = None
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _take_writer_lock(self.path)
        elif not self.path.is_file():
            raise InputError(f"{self.path}: no such catalogue")
        try:
            self._db = self._connect()
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise InputError(f"{self.path}: not an xpcsfit catalogue ({exc})") from None
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self.write:
            db = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
        else:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            db.execute("PRAGMA query_only=ON")
        db.row_factory = sqlite3.Row
        return db

    def _check_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise InputError(
                f"{self.path}: catalogue schema {version} is newer than this xpcsfit reads ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION and not self.write:
            raise InputError(
                f"{self.path}: catalogue schema {version}, this xpcsfit reads {SCHEMA_VERSION}; "
                "the next xpcsfit batch run migrates it")
        if self.write:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                # one script, one transaction: a kill or an error mid-migration leaves the old schema
                try:
                    self._db.executescript(
                        f"BEGIN IMMEDIATE; {MIGRATIONS[step]}; PRAGMA user_version = {step}; COMMIT;")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            with self._transaction():
                self._db.execute("UPDATE attempts SET status = 'interrupted' WHERE status = 'running'")

    # ------------------------------------------------------------------ writing

    def begin(self, *, input, sha256, q_index, q, mode, fingerprint) -> int:
        """Record the start of an attempt (status "running"); return its id.

        Parameters
        ----------
        input : str or Path
            The input file.
        sha256 : str
        q_index : sequence of int
        q : sequence of float
            1/Å, one per q index.
        mode : str
        fingerprint : str
        """
        q = [float(v) for v in q]
        with self._transaction():
            cur = self._db.execute(
                "INSERT INTO attempts (input, sha256, q_index, q, q_values, mode, fingerprint, status, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (str(input), sha256, _q_key(q_index), q[0] if len(q) == 1 else None, json.dumps(q),
                 mode, fingerprint, now()),
            )
        return int(cur.lastrowid)

    def finish(self, attempt: int, result: FitResult, result_path: str | Path | None) -> None:
        """Mark ``attempt`` done and make ``result`` its unit's current result, in one transaction.

        Parameters
        ----------
        attempt : int
            From :meth:`begin`.
        result : FitResult
            E.g. ``FitResult.from_json(<result dir>/fit.json)``.
        result_path : str or Path or None
            The fit's directory.
        """
        row = self._attempt(attempt)
        ended, wall = now(), _seconds_since(row["started_at"])
        values = {**dict(row), **_result_columns(result)}
        values.update(attempt=attempt, result_path=None if result_path is None else str(result_path),
                      wall_time_s=wall, ended_at=ended)
        columns = [c for c in self.columns("results") if c in values]
        with self._transaction():
            self._db.execute(
                "UPDATE attempts SET status = 'done', ended_at = ?, wall_time_s = ?, result_path = ? WHERE id = ?",
                (ended, wall, values["result_path"], attempt))
            self._db.execute(
                f"INSERT OR REPLACE INTO results ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [values[c] for c in columns])

    def fail(self, attempt: int, error: str) -> None:
        """Mark ``attempt`` failed with its one-line ``error``; the unit's current result stays."""
        row = self._attempt(attempt)
        with self._transaction():
            self._db.execute(
                "UPDATE attempts SET status = 'failed', error = ?, ended_at = ?, wall_time_s = ? WHERE id = ?",
                (" ".join(str(error).split()), now(), _seconds_since(row["started_at"]), attempt))

    def interrupt(self, attempt: int) -> None:
        """Mark ``attempt`` interrupted (the run was stopped while it ran); its unit is redone."""
        row = self._attempt(attempt)
        with self._transaction():
            self._db.execute(
                "UPDATE attempts SET status = 'interrupted', ended_at = ?, wall_time_s = ? WHERE id = ?",
                (now(), _seconds_since(row["started_at"]), attempt))

    def sha256(self, path: str | Path) -> str:
        """The sha256 of the file ``path``, read again only when its size or mtime changed.

        The ``hashes`` row of ``path`` is used when its size and ``st_mtime_ns`` are the
        file's now; otherwise the file is hashed (:func:`xpcsfit.io.hdf5.sha256_file`) and,
        on a writer, the row replaced.

        Raises
        ------
        OSError
            The file cannot be read.
        """
        st = os.stat(path)
        row = self._db.execute("SELECT size, mtime_ns, sha256 FROM hashes WHERE path = ?", (str(path),)).fetchone()
        if row is not None and (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            return row["sha256"]
        digest = sha256_file(path)
        after = os.stat(path)
        if self.write and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):  # not changed while read
            with self._transaction():
                self._db.execute("INSERT OR REPLACE INTO hashes (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
                                 (str(path), st.st_size, st.st_mtime_ns, digest))
        return digest

    # ------------------------------------------------------------------ reading

    def complete(self, input, q_index, fingerprint: str) -> dict | None:
        """The current result of the unit (input, q_index) if it has this fingerprint, else None."""
        row = self._db.execute(
            "SELECT * FROM results WHERE input = ? AND q_index = ? AND fingerprint = ?",
            (str(input), _q_key(q_index), fingerprint)).fetchone()
        return None if row is None else _row(row)

    def last_attempt(self, input, q_index) -> dict | None:
        """The latest attempt of the unit (input, q_index), or None if it has none."""
        row = self._db.execute(
            "SELECT * FROM attempts WHERE input = ? AND q_index = ? ORDER BY id DESC LIMIT 1",
            (str(input), _q_key(q_index))).fetchone()
        return None if row is None else _row(row)

    def results(self, where: str | None = None) -> list[dict]:
        """Current results (a dict per row; warnings and q_values as lists), optionally filtered.

        Parameters
        ----------
        where : str, optional
            An SQL expression over the columns of ``results``, e.g. ``"converged AND q > 0.005"``.

        Raises
        ------
        ConfigError
            ``where`` is not a valid expression (the message quotes it and SQLite's reason).
        """
        return self._select("results", where, "input, q_index")

    def attempts(self, where: str | None = None) -> list[dict]:
        """Every attempt, oldest first, optionally filtered by an SQL ``where`` over its columns."""
        return self._select("attempts", where, "id")

    def latest(self) -> list[dict]:
        """Per unit, its latest attempt (``status``, ``error``, times) with its current
        result's columns (None where it has none), ordered by input and q_index."""
        unit = ("input", "q_index", "q", "q_values", "mode")  # from the attempt: a unit may have no result
        result = ", ".join(f"r.{c}" for c in self.columns("results") if c not in unit)
        rows = self._db.execute(
            "SELECT a.id AS attempt_id, a.status, a.error, a.started_at, a.ended_at AS attempt_ended_at,"
            f" a.fingerprint AS attempt_fingerprint, {', '.join(f'a.{c}' for c in unit)}, {result}"
            " FROM attempts a LEFT JOIN results r ON r.input = a.input AND r.q_index = a.q_index"
            " WHERE a.id = (SELECT max(id) FROM attempts b WHERE b.input = a.input AND b.q_index = a.q_index)"
            " ORDER BY a.input, a.q_index").fetchall()
        return [_row(r) for r in rows]

    def _select(self, table: str, where: str | None, order: str) -> list[dict]:
        sql = f"SELECT * FROM {table}" + (f" WHERE ({where})" if where else "") + f" ORDER BY {order}"
        try:
            return [_row(r) for r in self._db.execute(sql).fetchall()]
        except sqlite3.Error as exc:
            if where is None:
                raise
            raise ConfigError(f"where {where!r}: not a valid condition on {table} ({exc})") from None

    # ------------------------------------------------------------------ plumbing

    def _attempt(self, attempt: int) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM attempts WHERE id = ?", (attempt,)).fetchone()
        if row is None:
            raise KeyError(f"no attempt {attempt} in {self.path}")
        return row

    def columns(self, table: str) -> list[str]:
        """The column names of ``table`` ("attempts" or "results"), in order."""
        return [r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")]

    def _transaction(self):
        return _Transaction(self._db)

    def close(self) -> None:
        """Close the connection and release the writer's lock."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None
        if self._lock is not None:
            release_lock(f"{self.path}.lock", self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, *_):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def catalogue(path: str | Path, where: str | None = None):
    """The current results of a catalogue as a pandas DataFrame, one row per unit.

    Parameters
    ----------
    path : str or Path
        The catalogue (``<out-root>/xpcsfit.sqlite``).
    where : str, optional
        SQL condition over the columns (see :mod:`xpcsfit.batch.catalogue`).

    Returns
    -------
    pandas.DataFrame
        The columns of ``results``; ``warnings`` and ``q_values`` as lists, ``converged``
        as bool, ``ended_at`` as UTC datetimes.

    Raises
    ------
    ImportError
        pandas is not installed.
    InputError, ConfigError
        As for :class:`Catalogue` and :meth:`Catalogue.results`.
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("xpcsfit.catalogue needs pandas: pip install pandas") from None
    with Catalogue(path) as cat:
        rows, columns = cat.results(where), cat.columns("results")
    frame = pd.DataFrame(rows, columns=columns)
    frame["converged"] = frame["converged"].astype(bool)
    frame["ended_at"] = pd.to_datetime(frame["ended_at"], utc=True)
    return frame


def _take_writer_lock(path: Path) -> int:
    try:
        return take_lock(f"{path}.lock")
    except LockHeld:
        raise XpcsfitError(f"{path}: another xpcsfit batch is writing this catalogue") from None


def _q_key(q_index) -> str:
    return ",".join(str(int(i)) for i in q_index)


def _row(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in ("warnings", "q_values"):
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


def _seconds_since(iso: str) -> float:
    return max(0.0, (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds())


def _result_columns(result: FitResult) -> dict:
    """The ``results`` columns a FitResult gives: parameters, transport at the window's
    start, middle and end with their 1-sigma bands, goodness of fit, warnings."""
    out = {}
    for name, value, err in zip(result.names, result.values, result.stderr):
        out[name], out[f"{name}_stderr"] = float(value), float(err)
    t = np.asarray(result.transport["t"], float)
    points = np.array([t[0], 0.5 * (t[0] + t[-1]), t[-1]])
    bands = transport_bands(result.mode, result.values, result.covariance, points)
    for i, p in enumerate(POINTS):
        out[f"t_{p}"] = float(points[i])
        for key in ("J", "gamma_dot"):
            if key in bands:
                out[f"{key}_{p}"] = float(bands[key][i])
                out[f"{key}_stderr_{p}"] = float(bands[f"{key}_stderr"][i])
    out.update(chi2=float(result.chi2), reduced_chi2=float(result.reduced_chi2), dof=int(result.dof),
               converged=int(bool(result.converged)), termination=str(result.termination),
               warnings=json.dumps(list(result.warnings)), n_warnings=len(result.warnings))
    return out
