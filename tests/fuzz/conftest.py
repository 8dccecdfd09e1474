"""The fuzz suite's case counts are printed by tests/conftest.py (see harness.py)."""
