"""xpcsfit: Dask-distributed fitting of XPCS two-time correlation data.

Public API (everything else is private and may move):

- :func:`fit` — homodyne fit of an HDF5 result file or store on a Dask cluster.
- :func:`open_dataset` — a lazy xarray view of two-time maps.
- :func:`ingest` — write a Zarr store aligned to angle strata.
- :func:`cmc` — posterior by Consensus Monte Carlo, NUTS shards on Dask.
- :class:`FitResult`, :class:`CMCResult`, :class:`FitConfig`, and the errors.
"""

__version__ = "0.1.0"

from ._cmc import cmc
from ._cmc_summary import CMCResult
from ._config import FitConfig, load_config
from ._dataset import open_dataset
from ._errors import ConfigError, InputError, XpcsfitError
from ._fit import GapWarning, fit
from ._results import FitResult
from ._store import ingest


__all__ = [
    "CMCResult",
    "ConfigError",
    "FitConfig",
    "FitResult",
    "GapWarning",
    "InputError",
    "XpcsfitError",
    "cmc",
    "fit",
    "ingest",
    "load_config",
    "open_dataset",
]
