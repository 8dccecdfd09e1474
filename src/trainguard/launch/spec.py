"""``JobSpec``: what to run and how to keep it alive, as validated, serialisable data.

The retry policy is shaped like Modal's ``modal.Retries`` (retries, initial delay, backoff
coefficient, max delay), so the same spec maps onto the Modal backend.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
from dataclasses import asdict, dataclass, field

from trainguard._units import human_duration
from trainguard.launch.torchrun import TorchrunConfig, torchrun_command

#: The public name of :func:`trainguard._units.human_duration`, kept where it always was
#: (``from trainguard.launch import format_duration``).
format_duration = human_duration

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"12h"``, ``"1h30m"``, ``"45s"``, ``"2d"`` or a plain number of seconds.

    Raises:
        ValueError: not a duration (the message shows the accepted forms).
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        try:
            seconds = float(raw)
        except ValueError:
            parts = _DURATION.findall(raw)
            if not parts or "".join(n + u for n, u in parts) != raw.replace(" ", ""):
                raise ValueError(f"cannot read {text!r} as a duration; use e.g. 90, 45s, "
                                 f"30m, 12h, 1h30m or 2d") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {text!r} must be a non-negative number of seconds")
    return seconds


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried.

    Attributes:
        retries: failed attempts retried after the first (0: fail on the first failure).
        delay: seconds before the first retry.
        backoff: each further retry waits ``backoff`` times longer.
        max_delay: upper bound of one wait.
        max_resumes: restarts after a preemption (exit code "resume me"), which do not
            consume a retry; bounded so a job preempted forever still ends.
    """

    retries: int = 3
    delay: float = 10.0
    backoff: float = 2.0
    max_delay: float = 600.0
    max_resumes: int = 50

    def __post_init__(self) -> None:
        for name in ("retries", "max_resumes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        for name in ("delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        if not isinstance(self.backoff, (int, float)) or not 1.0 <= self.backoff <= 100:
            raise ValueError(f"backoff must be between 1 and 100, got {self.backoff!r}")

    def delay_before_retry(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_delay, self.delay * self.backoff ** (retry - 1))


_LOADING = threading.local()  # .active is set while from_json rebuilds a stored spec


@dataclass(frozen=True)
class JobSpec:
    """A job: a script, its arguments, its run directory, and how to keep it alive.

    Attributes:
        script: the training script (a path).
        args: its command-line arguments.
        run_dir: where the script's ``trainguard.Run`` writes (exported to the script as
            ``TRAINGUARD_RUN_DIR``); the supervisor reads its heartbeat and checkpoints.
        name: a label for ``ps``.
        retry: the retry policy.
        timeout: seconds one attempt may run (None: no limit); past it, the attempt is
            stopped gracefully and retried (it resumes from its last checkpoint).
        hang_timeout: seconds without progress in the heartbeat before the attempt is
            stopped and retried (None: no hang detection).
        stop_grace: seconds between SIGTERM (save and exit) and SIGKILL.
        gpu_hourly_usd: price of the machine per hour, for cost accounting.
        budget_usd: stop the job gracefully when its cost would exceed this.
        env: extra environment variables for the script.
        cwd: working directory of the script.
        python: the interpreter that runs the script.
    """

    script: str
    args: tuple[str, ...] = ()
    run_dir: str = ""
    name: str = ""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None
    hang_timeout: float | None = None
    stop_grace: float = 30.0
    gpu_hourly_usd: float | None = None
    budget_usd: float | None = None
    env: dict = field(default_factory=dict)
    cwd: str = ""
    python: str = sys.executable
    #: Start the script through torchrun (``launch/torchrun.py``); None: plain python.
    torchrun: dict | None = None

    def __post_init__(self) -> None:
        if self.torchrun is not None:  # a dict keeps to_json/from_json plain; validate it
            TorchrunConfig(**self.torchrun)
        cwd = os.path.abspath(self.cwd or os.getcwd())
        script = os.path.join(cwd, self.script)
        if not getattr(_LOADING, "active", False) and not os.path.isfile(script):
            raise FileNotFoundError(f"script {self.script} does not exist (looked in {cwd})")
        set_ = object.__setattr__
        set_(self, "cwd", cwd)
        set_(self, "script", os.path.abspath(script))
        set_(self, "args", tuple(str(a) for a in self.args))
        stem = os.path.splitext(os.path.basename(self.script))[0]
        set_(self, "name", self.name or stem)
        set_(self, "run_dir", os.path.abspath(os.path.join(cwd, self.run_dir or f"runs/{stem}")))
        for name in ("timeout", "hang_timeout"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.stop_grace, (int, float)) or self.stop_grace < 0:
            raise ValueError(f"stop_grace must be >= 0 seconds, got {self.stop_grace!r}")
        for name in ("gpu_hourly_usd", "budget_usd"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.budget_usd is not None and not self.gpu_hourly_usd:
            raise ValueError("budget_usd needs gpu_hourly_usd (the price per hour) to be set")

    @property
    def command(self) -> list[str]:
        """The command line of one attempt."""
        if self.torchrun is not None:
            return torchrun_command(self.python, self.script, self.args,
                                    TorchrunConfig(**self.torchrun))
        return [self.python, self.script, *self.args]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """A stored spec. The script is not required to exist any more: a job whose
        script was moved must still be listed, watched and stopped (its next attempt
        fails and says why)."""
        doc = json.loads(text)
        doc["retry"] = RetryPolicy(**doc["retry"])
        doc["args"] = tuple(doc["args"])
        _LOADING.active = True
        try:
            return cls(**doc)
        finally:
            _LOADING.active = False
