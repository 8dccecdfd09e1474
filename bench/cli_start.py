"""Start time of ``trainguard`` commands, as ratios to a bare Python importing click + sqlite3.

Each command runs in a fresh process ``--repeat`` times (best time kept) against an empty
``TRAINGUARD_HOME``; the floor, ``python -c "import click, sqlite3"``, is measured in the
same run, so the ratios compare like with like on a noisy, shared machine. The goal from
issue 15: every command at most 4x the floor plus 0.15 s.

    python bench/cli_start.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "--help": ["--help"],
    "ps": ["ps"],
    "status MISSING": ["status", "nosuchjob"],
    "logs MISSING": ["logs", "nosuchjob"],
    "stop MISSING": ["stop", "nosuchjob"],
    "run --help": ["run", "--help"],
    "sync --help": ["sync", "--help"],
    "preflight --help": ["preflight", "--help"],
}


def best_of(argv: list[str], repeat: int, env: dict) -> float:
    """The fastest of ``repeat`` wall times of ``argv`` (a failing command counts too)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, TRAINGUARD_HOME=home)
        floor = best_of([sys.executable, "-c", "import click, sqlite3"], args.repeat, env)
        print(f"floor (python -c 'import click, sqlite3'): {floor:.3f} s; "
              f"goal: <= {4 * floor + 0.15:.3f} s (4x + 0.15 s)")
        print(f"{'command':28} {'best':>8} {'x floor':>8}  goal")
        rows = [("import trainguard", [sys.executable, "-c", "import trainguard"])]
        rows += [(f"trainguard {name}", [sys.executable, "-m", "trainguard", *argv])
                 for name, argv in COMMANDS.items()]
        for name, argv in rows:
            seconds = best_of(argv, args.repeat, env)
            ok = "met" if seconds <= 4 * floor + 0.15 else "MISSED"
            print(f"{name:28} {seconds:>7.3f}s {seconds / floor:>7.1f}x  {ok}")


if __name__ == "__main__":
    main()
