"""Every exception trainguard defines, and the exit codes of its command line.

Every error trainguard raises on purpose derives from :class:`TrainguardError`, so
``except TrainguardError`` catches all of them. The tree is shallow on purpose. The number
is the class's ``exit_code``: what ``trainguard`` exits with when that error ends a
command (a script that lets one escape exits 1, as Python does)::

    TrainguardError              1  any other error raised on purpose
    ├── LockHeld                 3  another live writer owns the run directory
    ├── DataGateFailed           4  the dataset is empty, stale or fails a requirement
    ├── NonFiniteLoss            5  the loss stayed NaN/inf after the allowed rollbacks
    ├── PreflightFailed          6  a preflight check failed: the launch would have too
    ├── DataCheckFailed          7  a data check failed on the first batches of an attempt
    ├── RunDirError              8  a run directory is missing, empty or not a directory
    ├── StoreError              10  a storage backend failed (I/O, permissions)
    │   └── UnsafePath          11  a link or special file where a plain file belongs
    ├── CheckpointError         20  a checkpoint-level problem (e.g. a save that failed)
    │   ├── CheckpointCorrupt   21  checksum / size / format mismatch: never loaded
    │   ├── CheckpointNotFound  22  nothing valid to restore (also a FileNotFoundError)
    │   ├── CheckpointExists    23  a committed checkpoint already holds that step
    │   └── StateMismatch       24  saved state does not fit the object restored into
    ├── JobNotFound             30  no job with that id (or id prefix)
    ├── JobBusy                 31  the verb needs an ended job and this one still runs
    ├── RunDirBusy              32  another job still runs on this run directory
    ├── JobTableError           33  the job table cannot be opened or written
    ├── BackendUnreachable      34  the service a job runs on cannot be asked right now
    ├── ModalConfigError        40  a Modal option outside Modal's limits (also a ValueError)
    ├── ModalLaunchFailed       41  Modal refused or failed the launch
    ├── AttemptPreempted        42  a Modal attempt committed, stopped early (also a RuntimeError)
    └── AttemptFailed           43  a Modal attempt's script failed (also a RuntimeError)

One class is not an error and stands outside the tree: a ``SystemExit``, so that
``except Exception`` in user code does not swallow it::

    Preempted                   75  a preemption save committed: run the same command

Exit codes no error uses: 0 (success), 2 (click's usage error: a bad option or
argument), 75 (:data:`EXIT_RESUME`, only :class:`Preempted`'s) and 128 + N (a process
killed by signal N; a foreground ``trainguard run`` stopped by signal N). Codes are
grouped: 3-8 the common refusals (kept from earlier versions), 10s the store, 20s
checkpoints, 30s jobs, 40s Modal. ``tests/unit/test_errors.py`` checks this drawing
against the classes and that no two classes share a code.

Each user-facing error has a message that names the thing at fault and the fix.
Lower-layer errors (``OSError``, ``sqlite3.Error``) are translated at the boundary with
``raise StoreError(...) from exc`` so the cause is kept. This module imports nothing
(the CLI's fast start imports it); the modules that raise these errors re-export the
names they raise, e.g. ``trainguard.launch.jobs.JobNotFound``.
"""

from __future__ import annotations

#: Exit code of a process that was preempted (SIGTERM/SIGINT) and committed its state:
#: "restart me and I will resume". 75 is ``EX_TEMPFAIL`` from BSD ``sysexits.h``
#: ("temporary failure; the user is invited to retry"), distinct from 0 (done), 1 (an
#: error, Python's default) and 128+N (killed by signal N).
EXIT_RESUME = 75


class TrainguardError(Exception):
    """Root of every error trainguard raises on purpose.

    Attributes:
        exit_code: the process exit code the CLI uses for this error.
    """

    exit_code: int = 1


class LockHeld(TrainguardError):
    """Another live process holds the run directory's writer lock."""

    exit_code = 3


class DataGateFailed(TrainguardError):
    """The dataset is missing, stale, or its totals fail a requirement; no step was run."""

    exit_code = 4


class NonFiniteLoss(TrainguardError):
    """The loss stayed NaN/inf after the allowed rollbacks (or nothing to roll back to)."""

    exit_code = 5


class PreflightFailed(TrainguardError):
    """A preflight check failed: the launch would have failed later, on paid time."""

    exit_code = 6


class DataCheckFailed(TrainguardError):
    """A data check failed on the first batches: the data, not the model, is wrong."""

    exit_code = 7


class RunDirError(TrainguardError):
    """A run directory is missing, empty, or is not a directory."""

    exit_code = 8


class StoreError(TrainguardError):
    """A storage backend could not read, write, list or delete a key."""

    exit_code = 10


class UnsafePath(StoreError):
    """A path in a run directory is a symbolic link or not a regular file.

    trainguard never makes either inside a run directory, so one found there was planted
    or copied in by mistake: it is neither read nor written through.
    """

    exit_code = 11


class CheckpointError(TrainguardError):
    """Base class for checkpoint-level problems; raised itself when a save fails."""

    exit_code = 20


class CheckpointCorrupt(CheckpointError):
    """A checkpoint failed verification (checksum, size, format); it is never loaded."""

    exit_code = 21


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No valid checkpoint exists where one was asked for."""

    exit_code = 22


class CheckpointExists(CheckpointError):
    """A committed checkpoint already exists at the step being saved."""

    exit_code = 23


class StateMismatch(CheckpointError):
    """A saved value does not fit the live object it is restored into."""

    exit_code = 24


class JobNotFound(TrainguardError):
    """No job with that id (or id prefix)."""

    exit_code = 30


class JobBusy(TrainguardError):
    """The verb needs an ended job (``rm``, ``resume``) and this one still runs."""

    exit_code = 31


class RunDirBusy(TrainguardError):
    """Another job still runs on this run directory (one job per run directory)."""

    exit_code = 32

    def __init__(self, job_id: str, run_dir: str) -> None:
        super().__init__(f"job {job_id} already runs on {run_dir}: one job writes a run "
                         f"directory at a time. Give this one its own (--run-dir DIR, or "
                         f"--name for Modal), or end that one first (`trainguard stop "
                         f"{job_id}`)")
        self.job_id, self.run_dir = job_id, run_dir


class JobTableError(TrainguardError):
    """The job table cannot be opened or written (corrupt, read-only, not a database)."""

    exit_code = 33


class BackendUnreachable(TrainguardError):
    """The service a job runs on cannot be asked right now (its recorded state stands)."""

    exit_code = 34


class ModalConfigError(TrainguardError, ValueError):
    """A Modal option is outside Modal's limits (the message states the limit).

    Also a ``ValueError``: it is a bad value, and callers that catch ``ValueError`` for
    option parsing catch it too. The CLI shows it as a usage error (exit code 2) where it
    checks an option; ``exit_code`` applies where it ends a command otherwise.
    """

    exit_code = 40


class ModalLaunchFailed(TrainguardError):
    """Modal refused or failed the launch (the message names what Modal said)."""

    exit_code = 41


# The two below are raised inside a Modal container, where Modal's ``Retries`` run the
# input again after any exception; Modal pickles the exception back to the client, so
# they take one message argument only (``ps`` shows ``AttemptFailed: <message>``).


class AttemptPreempted(TrainguardError, RuntimeError):
    """The attempt saved, committed and stopped early (preemption or timeout): run it again.

    Raised so that Modal does not report the input as done; it is not
    :class:`Preempted`, which ends a training script's own process.
    """

    exit_code = 42


class AttemptFailed(TrainguardError, RuntimeError):
    """The training script of a Modal attempt exited with a failure code."""

    exit_code = 43


class Preempted(SystemExit):
    """Raised by ``run.steps()`` once the preemption save is committed.

    It is a ``SystemExit`` (not an ``Exception``), so ``except Exception`` in user code
    does not swallow it, and an uncaught one ends the process with :data:`EXIT_RESUME`
    and no traceback.

    Attributes:
        step: the step whose checkpoint was committed (or the last committed one).
        signal_name: the signal that asked for the stop, e.g. ``"SIGTERM"``.
        exit_code: :data:`EXIT_RESUME` (also the ``SystemExit`` code).
    """

    exit_code = EXIT_RESUME

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(EXIT_RESUME)
        self.step = step
        self.signal_name = signal_name

    def __str__(self) -> str:
        return (f"preempted by {self.signal_name}: step {self.step} is committed; exiting "
                f"with code {EXIT_RESUME} (EXIT_RESUME): run the same command to resume")
