"""The batch service (DESIGN.md §6b): the parts a batch run is built of.

- :mod:`~xpcsfit.batch.discover` — the two-time result files under ROOT(s); the others
  skipped with their reason.
- :mod:`~xpcsfit.batch.settings` — the ``xpcsfit.yaml`` cascade (nearest wins, merged key
  by key over ``--config``) into :class:`BatchSettings`.
- :mod:`~xpcsfit.batch.units` — a file's units of work (one fit per q, or one joint fit).
- :mod:`~xpcsfit.batch.fingerprint` — what makes a stored result the result of a unit.
- :mod:`~xpcsfit.batch.catalogue` — the SQLite results catalogue and its queries.
- :mod:`~xpcsfit.batch.report` — the static index.html.
- :mod:`~xpcsfit.batch.plan` — fit or skip each unit, and why (``--dry-run``).
- :mod:`~xpcsfit.batch.query` — ``xpcsfit results``: the catalogue as table, CSV, JSON.

Nothing is re-exported here: three modules share their names with their main function
(``discover``, ``fingerprint``, ``catalogue``), and a re-export would hide the module
behind the function (``from xpcsfit.batch import catalogue``). Import from the modules;
the public names (``xpcsfit.batch(...)``, ``xpcsfit.catalogue``) belong in
``xpcsfit/__init__.py``.
"""
