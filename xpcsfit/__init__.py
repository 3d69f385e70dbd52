"""xpcsfit: Dask-distributed fitting of XPCS two-time correlation data.

Public API (everything else is private and may move):

- :func:`fit` — homodyne fit of an HDF5 result file or store on a Dask cluster.
- :func:`open_dataset` — a lazy xarray view of two-time maps.
- :func:`ingest` — write a Zarr store aligned to angle strata.
- :func:`cmc` — posterior by Consensus Monte Carlo, NUTS shards on Dask.
- :func:`batch` — fit every result file under directories on one cluster (``xpcsfit
  batch``); :func:`catalogue` — its results catalogue as a pandas DataFrame.
- :func:`enable_float64` — switch JAX to float64 in this process (see below).
- :class:`FitResult`, :class:`CMCResult`, :class:`FitConfig`, and the errors.

Float64: the model and the kernels need JAX in float64. ``import xpcsfit`` changes no
JAX setting; :func:`enable_float64` sets ``jax_enable_x64`` for the whole process, and
xpcsfit calls it wherever its JAX code runs: in :func:`fit` and :func:`cmc`, in every
tile-kernel entry point, in the in-process evaluator and in the Dask worker preload. Call
it yourself before using ``xpcsfit.model`` directly.
"""

__version__ = "0.1.0"

# xpcsfit.batch and xpcsfit.catalogue are the functions (as xpcsfit.cmc): the packages
# are reached as ``from xpcsfit.batch import run, catalogue``.
from xpcsfit.batch.catalogue import catalogue
from xpcsfit.batch.run import batch
from xpcsfit.cmc.driver import cmc
from xpcsfit.cmc.results import CMCResult
from xpcsfit.config import FitConfig, load_config
from xpcsfit.errors import ConfigError, InputError, SamplingError, XpcsfitError
from xpcsfit.io.dataset import open_dataset
from xpcsfit.io.store import ingest
from xpcsfit.leastsq.driver import fit
from xpcsfit.leastsq.results import FitResult
from xpcsfit.model import enable_float64
from xpcsfit.parameters import GapWarning

__all__ = [
    "CMCResult",
    "ConfigError",
    "FitConfig",
    "FitResult",
    "GapWarning",
    "InputError",
    "SamplingError",
    "XpcsfitError",
    "batch",
    "catalogue",
    "cmc",
    "enable_float64",
    "fit",
    "ingest",
    "load_config",
    "open_dataset",
]
