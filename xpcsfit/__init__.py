"""xpcsfit: Dask-distributed fitting of XPCS two-time correlation data.

Public API (everything else is private and may move):

- :func:`fit` — homodyne fit of an HDF5 result file or store on a Dask cluster.
- :func:`open_dataset` — a lazy xarray view of two-time maps.
- :func:`ingest` — write a Zarr store aligned to angle strata.
- :func:`cmc` — posterior by Consensus Monte Carlo, NUTS shards on Dask.
- :class:`FitResult`, :class:`CMCResult`, :class:`FitConfig`, and the errors.
"""

__version__ = "0.1.0"

from xpcsfit.cmc.driver import cmc
from xpcsfit.cmc.results import CMCResult
from xpcsfit.config import FitConfig, load_config
from xpcsfit.io.dataset import open_dataset
from xpcsfit.errors import ConfigError, InputError, XpcsfitError
from xpcsfit.leastsq.driver import GapWarning, fit
from xpcsfit.leastsq.results import FitResult
from xpcsfit.io.store import ingest


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
