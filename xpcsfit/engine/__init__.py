"""The engine: the sums a pass returns (``sums``), tiles, the JAX tile kernel, the
evaluators (in process and on Dask), the cluster, and the names the Dask dashboard
shows (``spans``)."""
