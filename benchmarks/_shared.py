"""Where the shared APS files are: beside the checkout (the one definition the
benchmarks use; the tests have tests/conftest.py's ``shared_data`` fixture)."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
