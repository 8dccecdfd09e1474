"""Start time of ``trainguard`` commands, as ratios to a bare Python importing click + sqlite3.

Each command runs in a fresh process ``--repeat`` times (best time kept) against an empty
``TRAINGUARD_HOME``; the floor, ``python -c "import click, sqlite3"``, is measured in the
same run, so the ratios compare like with like on a noisy, shared machine. The goal from
issue 15: every command at most 4x the floor plus 0.15 s. ``--before SRC`` times another
version of the package too (its ``src`` directory, e.g. from ``git archive``), command by
command in the same run:

    python bench/cli_start.py --repeat 5
    git archive 9f305b8 src | tar -x -C /tmp/base
    python bench/cli_start.py --repeat 5 --before /tmp/base/src
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
    "rm MISSING": ["rm", "nosuchjob"],
    "resume MISSING": ["resume", "nosuchjob"],
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
    parser.add_argument("--before", default=None, metavar="SRC",
                        help="also time the package found in this directory (PYTHONPATH)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, TRAINGUARD_HOME=home)
        envs = {"now": env}
        if args.before:
            envs = {"before": dict(env, PYTHONPATH=os.path.abspath(args.before)), **envs}
        floor = best_of([sys.executable, "-c", "import click, sqlite3"], args.repeat, env)
        goal = 4 * floor + 0.15
        print(f"floor (python -c 'import click, sqlite3'): {floor:.3f} s; "
              f"goal: <= {goal:.3f} s (4x + 0.15 s)")
        print(f"{'command':28}" + "".join(f" {label + ' s':>10} {'x floor':>8}" for label in envs)
              + "  goal (now)")
        rows = [("import trainguard", [sys.executable, "-c", "import trainguard"])]
        rows += [(f"trainguard {name}", [sys.executable, "-m", "trainguard", *argv])
                 for name, argv in COMMANDS.items()]
        for name, argv in rows:
            seconds = {label: best_of(argv, args.repeat, e) for label, e in envs.items()}
            cells = "".join(f" {s:>10.3f} {s / floor:>7.1f}x" for s in seconds.values())
            print(f"{name:28}{cells}  {'met' if seconds['now'] <= goal else 'MISSED'}")


if __name__ == "__main__":
    main()
