#!/usr/bin/env bash
# Create .venv if missing, install trainguard with its dev extras, lint (ruff), run the whole
# test suite.
# Extra arguments go to pytest (e.g. ./scripts/test.sh tests/unit -x).
# The suite runs on TEST_WORKERS pytest-xdist workers (default 2, one test file each: most
# of its time is spent waiting on real processes); TEST_WORKERS=0 runs it in one process.
source "$(dirname "$0")/_venv.sh" dev
# Lint first: the rule set and why is [tool.ruff] in pyproject.toml; zero findings allowed.
"$ROOT/.venv/bin/ruff" check --no-cache --quiet "$ROOT" \
    || { echo "ruff: fix the findings above (\`.venv/bin/ruff check --fix\` fixes the safe ones)" >&2; exit 1; }
exec "$VPY" -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
