"""The engine: tiles, the JAX tile kernel, the evaluators (in process and on Dask), the cluster."""
