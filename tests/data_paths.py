"""The one definition of where the shared APS result files are: ``../shared/data``
beside the checkout (DEVELOPERS.md), with their ground truth and README."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLOW = SHARED_DATA / "flow_small.hdf"
STATIC = SHARED_DATA / "static_small.hdf"
