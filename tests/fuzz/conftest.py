"""Prints the fuzz suite's case counts at the end of the session (see harness.py)."""

from __future__ import annotations

from tests.fuzz.harness import CASES, EXAMPLES, FAILURES


def pytest_terminal_summary(terminalreporter):
    if CASES:
        total, failed = sum(CASES.values()), sum(FAILURES.values())
        detail = ", ".join(f"{name} {count}" for name, count in sorted(CASES.items()))
        terminalreporter.write_line(
            f"fuzz: {total} cases run ({detail}), {failed} failing cases "
            f"(TRAINGUARD_FUZZ_EXAMPLES={EXAMPLES} per test)")
