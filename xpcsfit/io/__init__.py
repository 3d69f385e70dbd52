"""Files and stores: the readers and writers of each file layout, the Zarr store, atomic writes."""
