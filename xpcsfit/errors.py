"""The one exception hierarchy of xpcsfit.

The CLI turns every :class:`XpcsfitError` into a one-line message and a non-zero
exit code; anything else is a bug and keeps its traceback.
"""


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
