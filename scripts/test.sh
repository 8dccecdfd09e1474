#!/usr/bin/env bash
# Create .venv if missing, install trainguard with its dev extras, run the whole test suite.
# Extra arguments go to pytest (e.g. ./scripts/test.sh tests/unit -x).
source "$(dirname "$0")/_venv.sh" dev
exec "$VPY" -m pytest "$@"
