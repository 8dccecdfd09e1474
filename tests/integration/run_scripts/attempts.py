"""The parent side of the fork server: start attempts, follow their stdout, kill -9 them.

The kill plan of the tests lives here too: an attempt is killed a random number of its
output lines after a checkpoint it committed has been *observed* in the run directory,
so where the kill lands follows what the run did, whatever the machine's speed.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERVER = "tests.integration.run_scripts.forkserver"
LINE_TIMEOUT = 120.0  # a child silent this long is stuck: fail instead of hanging


def newest_commit(run_dir: Path) -> int:
    """The newest step with a manifest (the commit marker); 0 when none."""
    steps = [int(p.parent.name.removeprefix("step-"))
             for p in (Path(run_dir) / "checkpoints").glob("step-*/manifest.json")]
    return max(steps, default=0)


class Attempt:
    """One forked training attempt; its stdout is a FIFO the test reads line by line.

    It offers what the tests use of ``subprocess.Popen`` (``pid``, ``stdout``,
    ``send_signal``, ``kill``, ``wait(timeout)``, ``communicate``, ``returncode``), so
    helpers written for Popen work unchanged.
    """

    def __init__(self, server: ForkServer, pid: int, fifo_fd: int | None) -> None:
        self.server, self.pid, self._fd = server, pid, fifo_fd
        self._buffer = b""
        self.returncode: int | None = None
        self.stdout = _Lines(self)

    @property
    def code(self) -> int | None:
        return self.returncode

    def _fill(self) -> bool:
        """Read what the child wrote; False at the end of its output."""
        if self._fd is None:
            return False
        ready, _, _ = select.select([self._fd], [], [], LINE_TIMEOUT)
        assert ready, f"attempt {self.pid} printed nothing for {LINE_TIMEOUT:.0f} s"
        chunk = os.read(self._fd, 65536)
        if not chunk:
            os.close(self._fd)
            self._fd = None
            return False
        self._buffer += chunk
        return True

    def lines(self) -> Iterator[str]:
        """The child's stdout lines (without the newline) as they come."""
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                yield line.decode()
            if not self._fill():
                return

    def read_rest(self) -> str:
        """Everything the child still writes, up to the end of its output."""
        while self._fill():
            pass
        rest, self._buffer = self._buffer, b""
        return rest.decode()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, the real thing."""
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (-9 when killed), once the child has exited."""
        if self.returncode is None:
            if timeout is None:
                self.returncode = self.server.request({"op": "wait", "pid": self.pid})["code"]
            else:
                deadline = time.monotonic() + timeout
                while self.returncode is None:
                    self.returncode = self.server.request({"op": "poll", "pid": self.pid})["code"]
                    if self.returncode is None:
                        if time.monotonic() > deadline:
                            raise subprocess.TimeoutExpired(f"attempt {self.pid}", timeout)
                        time.sleep(0.02)
        return self.returncode

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        out = self.read_rest()
        self.wait(timeout)
        return out, None


class _Lines:
    """``attempt.stdout``: iterating gives lines with their newline, like a text pipe."""

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt

    def __iter__(self) -> Iterator[str]:
        return (line + "\n" for line in self._attempt.lines())

    def read(self) -> str:
        return self._attempt.read_rest()


class ForkServer:
    """A running fork server (see forkserver.py), with torch and ``preload`` imported."""

    def __init__(self, tmp: Path, preload: tuple[str, ...]) -> None:
        self.tmp = Path(tmp)
        self._count = 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", SERVER, *preload], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        assert json.loads(self.proc.stdout.readline()).get("ready"), "fork server failed"

    def request(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], *, module: str | None = None, script: str | None = None,
              stderr: Path, follow: bool = True) -> Attempt:
        """Fork an attempt running ``module`` or ``script`` with ``argv``.

        With ``follow`` its stdout is a FIFO read through ``Attempt.lines()``; else it
        goes to a file (an attempt nobody reads must not block on a full pipe).
        """
        self._count += 1
        out = self.tmp / f"attempt-{self._count}.out"
        fd = None
        if follow:
            os.mkfifo(out)
            fd = os.open(out, os.O_RDONLY | os.O_NONBLOCK)  # a reader exists: no blocking
        target = {"module": module} if module else {"script": script}
        pid = self.request({"op": "start", "argv": argv, **target, "stdout": str(out),
                            "stderr": str(stderr)})["pid"]
        return Attempt(self, pid, fd)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_SHARED: ForkServer | None = None


def shared_server() -> ForkServer:
    """The fork server of this test process (started on first use, closed at exit)."""
    global _SHARED
    if _SHARED is None or _SHARED.proc.poll() is not None:
        _SHARED = ForkServer(Path(tempfile.mkdtemp(prefix="trainguard-forks-")), PRELOAD)
        atexit.register(_SHARED.close)
    return _SHARED


def kill_after_commit(attempt: Attempt, run_dir: Path, rng: random.Random,
                      at_line: str | None = None) -> int:
    """Let ``attempt`` run until a checkpoint newer than the run directory's newest at the
    start has landed, then a random 0-4 of its lines more (or, with ``at_line``, until
    the next line starting with it), then SIGKILL it. Returns its exit code: -9, or 0
    when it finished before the kill came."""
    before = newest_commit(run_dir)
    more, committed = rng.randint(0, 4), False
    for line in attempt.lines():
        if not committed:
            committed = newest_commit(run_dir) > before
            continue
        if at_line is not None:
            if line.startswith(at_line):
                break
        elif more == 0:
            break
        else:
            more -= 1
    if attempt.code is None:
        try:
            attempt.kill()
        except ProcessLookupError:  # it finished on its own
            pass
    return attempt.wait()


def _preload() -> tuple[str, ...]:
    """What the fork server imports once: torch, trainguard, and what the scripts use."""
    import importlib.util

    optional = ("torchdata.stateful_dataloader", "sklearn.datasets")
    present = tuple(m for m in optional if importlib.util.find_spec(m.split(".")[0]))
    return ("torch", "numpy", "torch.utils.data", "trainguard.run", *present)


PRELOAD = _preload()


def killed_and_resumed(server: ForkServer, tmp: Path, argv, target: dict, *, kills: int = 3,
                       seed: str = "0", at_line: str | None = None) -> tuple[Path, Path]:
    """A reference run (concurrently) and a run killed ``kills`` times, then finished.

    ``argv(run_dir)`` gives the command line of a run in ``run_dir``; ``target`` is
    ``{"module": M}`` or ``{"script": PATH}``. Every other kill waits for a line starting
    with ``at_line`` (when given). Returns (reference dir, resumed dir) once both ended
    with exit code 0.
    """
    log = tmp / "log"
    reference, resumed = tmp / "reference", tmp / "resumed"
    ref = server.start(argv(reference), **target, stderr=log, follow=False)
    rng = random.Random(seed)
    landed = 0
    for k in range(kills):
        attempt = server.start(argv(resumed), **target, stderr=log)
        code = kill_after_commit(attempt, resumed, rng, at_line=at_line if k % 2 else None)
        if code == 0:  # it finished before its kill came (a very slow parent)
            break
        assert code == -9, log.read_text()[-3000:]
        landed += 1
    assert landed >= 1, "no kill landed before the run finished"
    final = server.start(argv(resumed), **target, stderr=log, follow=False)
    assert final.wait() == 0, log.read_text()[-3000:]
    assert ref.wait() == 0, log.read_text()[-3000:]
    return reference, resumed
