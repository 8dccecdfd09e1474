"""Child processes for the Run integration tests (started with ``python -m``)."""
