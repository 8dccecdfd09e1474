#!/usr/bin/env bash
# Create .venv if missing, install trainguard with its dev extras, run the whole test suite.
# Extra arguments go to pytest (e.g. ./scripts/test.sh tests/unit -x).
# The suite runs on TEST_WORKERS pytest-xdist workers (default 2, one test file each: most
# of its time is spent waiting on real processes); TEST_WORKERS=0 runs it in one process.
source "$(dirname "$0")/_venv.sh" dev
exec "$VPY" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
