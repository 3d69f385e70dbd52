"""The one exception hierarchy of xpcsfit.

The CLI turns every :class:`XpcsfitError` into a one-line message and a non-zero
exit code; anything else is a bug and keeps its traceback.

Exit codes: 1 other xpcsfit error, 2 bad input file, 3 bad option or configuration,
4 a fit did not converge, 5 CMC diagnostics failed (or every shard failed),
:data:`EXIT_INCOMPLETE` (6) an ``xpcsfit batch`` run in which some fit failed or did not
converge, or a damaged file or bad setting kept a file from being fitted.
"""

# xpcsfit batch: the run went through, and some of its fits need a look (see README "Batch").
EXIT_INCOMPLETE = 6


class XpcsfitError(Exception):
    """Base class of every error xpcsfit raises on purpose."""

    exit_code = 1


class InputError(XpcsfitError):
    """An input file or store is missing, malformed, or holds invalid values."""

    exit_code = 2


class ConfigError(XpcsfitError):
    """A selection, option or configuration value is out of range or unknown."""

    exit_code = 3


class SamplingError(XpcsfitError):
    """Sampling gave nothing to report: every CMC shard failed (after its retries)."""

    exit_code = 5
