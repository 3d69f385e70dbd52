"""The engine: the sums a pass returns (``sums``), tiles, the JAX tile kernel, the
evaluators (in process and on Dask) and the cluster."""
