"""The job table: every job and every attempt, in SQLite (WAL mode).

Location: ``$TRAINGUARD_HOME/jobs.db`` (default ``~/.trainguard``); each job also has a
directory ``$TRAINGUARD_HOME/jobs/<id>/`` with one log file per attempt and the
supervisor's own log. WAL mode lets ``trainguard ps`` read while supervisors write.

The database and its WAL files are readable by their owner only (0600): a local job's
spec holds its ``--env`` values, which its supervisor needs for every attempt. Modal
jobs are stored with those values masked (they travel to Modal as a secret).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainguard.errors import JobBusy, JobNotFound, JobTableError, RunDirBusy
from trainguard.launch.spec import JobSpec
from trainguard.store.lock import pid_alive

STATUSES = ("pending", "running", "retrying", "succeeded", "failed", "stopped")
FINAL = ("succeeded", "failed", "stopped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT, spec TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, backend TEXT DEFAULT 'local',
    supervisor_pid INTEGER, child_pid INTEGER, attempt INTEGER DEFAULT 0,
    failures INTEGER DEFAULT 0, run_dir TEXT, step INTEGER, total INTEGER,
    last_commit_step INTEGER, last_commit_at REAL, last_heartbeat REAL, speed REAL,
    cost_usd REAL DEFAULT 0, stop_requested INTEGER DEFAULT 0, message TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL, n INTEGER NOT NULL, started REAL NOT NULL, ended REAL,
    exit_code INTEGER, reason TEXT, PRIMARY KEY (job_id, n)
);
"""


def _translated(method):
    """A JobTable method whose SQLite errors become one :class:`JobTableError`."""
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _table_error(self.path, exc) from exc
    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


def _private(path: Path) -> None:
    """Create ``path`` as 0600 if missing, or narrow it to 0600 (an older, 0644 table)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _table_error(path: Path, exc: sqlite3.Error) -> JobTableError:
    text = str(exc)
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        fix = (f"make it writable (chmod u+w {path} {path.parent}) or point TRAINGUARD_HOME "
               f"at a writable directory")
    else:
        fix = (f"move it aside (mv {path} {path}.broken) and run again: a new, empty table "
               f"is made; the jobs listed in the old one are forgotten, their run "
               f"directories are untouched")
    return JobTableError(f"the job table {path} cannot be used ({text}); {fix}")


def live_status(job: dict) -> str:
    """The job's status, or ``lost`` for a local job whose supervisor died without
    recording an end."""
    if job["status"] in FINAL or job.get("backend", "local") != "local":
        return job["status"]
    pid = job.get("supervisor_pid")
    return job["status"] if not pid or pid_alive(pid) else "lost"


def holds_run_dir(job: dict) -> bool:
    """Whether an unfinished job may still write its run directory: a local one while its
    supervisor or its training process lives (a lost job's attempt can outlive it); a job
    elsewhere (Modal) until it is seen to end."""
    if job["status"] in FINAL:
        return False
    if job.get("backend", "local") != "local":
        return True
    return any(pid and pid_alive(pid) for pid in (job.get("supervisor_pid"),
                                                   job.get("child_pid")))


def ended(job: dict) -> bool:
    """Whether nothing runs the job any more: final, or lost with no process left."""
    return not holds_run_dir(job)


def require_ended(job: dict, verb: str) -> None:
    """Refuse ``trainguard VERB`` on a job that still runs.

    Raises:
        JobBusy: something still runs the job; the message says to stop it first.
    """
    if not ended(job):
        raise JobBusy(f"job {job['id']} is {job['status']}; `trainguard stop {job['id']}` "
                      f"first, then `trainguard {verb} {job['id']}`")


def trainguard_home() -> Path:
    """``$TRAINGUARD_HOME`` or ``~/.trainguard``."""
    return Path(os.environ.get("TRAINGUARD_HOME") or Path.home() / ".trainguard")


@dataclass(frozen=True)
class Attempt:
    """One run of the job's script."""

    n: int
    started: float
    ended: float | None
    exit_code: int | None
    reason: str | None


class JobTable:
    """Jobs and attempts. Safe to use from several processes at once.

    Args:
        home: the trainguard home (default: :func:`trainguard_home`).
    """

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home) if home else trainguard_home()
        self.path = self.home / "jobs.db"
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            _private(self.path)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
            for suffix in ("-wal", "-shm"):  # made by the first write in WAL mode
                _private(self.path.with_name(self.path.name + suffix))
        except sqlite3.Error as exc:
            raise _table_error(self.path, exc) from exc
        except OSError as exc:
            raise JobTableError(f"the job table {self.path} cannot be opened ({exc}); make "
                                f"{self.home} a writable directory or point TRAINGUARD_HOME "
                                f"elsewhere") from exc

    def job_dir(self, job_id: str) -> Path:
        """The directory of a job's logs."""
        return self.home / "jobs" / job_id

    @_translated
    def create(self, spec: JobSpec, backend: str = "local", *, run_dir: str | None = None,
               holds: Callable[[dict], bool] | None = None) -> str:
        """Record a new pending job; returns its id.

        Args:
            run_dir: the run directory recorded (default ``spec.run_dir``; a Modal job's
                is ``modal://VOLUME/NAME``).
            holds: whether an unfinished job on the same run directory still holds it
                (its supervisor or its training process lives). With it, the check and
                the insert are one transaction: of two launches at once, one is refused.

        Raises:
            RunDirBusy: ``holds`` says another job holds the run directory.
        """
        job_id = secrets.token_hex(4)
        run_dir = run_dir or spec.run_dir
        now = time.time()
        with self._exclusive(run_dir, holds, job_id):
            self._db.execute(
                "INSERT INTO jobs (id, name, spec, status, created, updated, backend, run_dir, "
                "supervisor_pid) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                (job_id, spec.name, spec.to_json(), now, now, backend, run_dir,
                 os.getpid() if backend == "local" else None))
        self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        return job_id

    @_translated
    def reopen(self, job_id: str, holds: Callable[[dict], bool], **fields) -> None:
        """Make an ended job pending again (``trainguard resume``), with ``fields`` set,
        unless another job holds its run directory now.

        Raises:
            RunDirBusy: another unfinished job holds the run directory.
        """
        run_dir = self.get(job_id)["run_dir"]
        fields.update(status="pending", stop_requested=0, failures=0, updated=time.time())
        with self._exclusive(run_dir, holds, job_id):
            own = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if own is None:
                raise JobNotFound(f"no job {job_id!r}; `trainguard ps` lists the jobs")
            if holds(dict(own)):  # another `resume` got there first
                raise JobBusy(f"job {job_id} is {own['status']} again (resumed by another "
                              f"process); `trainguard status {job_id}` shows it")
            names = ", ".join(f"{k} = ?" for k in fields)
            self._db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    @contextlib.contextmanager
    def _exclusive(self, run_dir: str, holds: Callable[[dict], bool] | None, job_id: str):
        """One transaction: refuse if a job other than ``job_id`` holds ``run_dir``."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if holds is not None:
                for row in self._db.execute(
                        "SELECT * FROM jobs WHERE run_dir = ? AND id != ? AND status NOT IN "
                        f"({', '.join('?' * len(FINAL))})", (run_dir, job_id, *FINAL)):
                    if holds(dict(row)):
                        raise RunDirBusy(row["id"], run_dir)
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @_translated
    def delete(self, job_id: str, holds: Callable[[dict], bool] | None = None) -> None:
        """Forget a job: its row, its attempts and its logs (never its run directory).

        Raises:
            JobBusy: ``holds`` says the job runs (checked in the same transaction as the
                delete: a ``resume`` in between wins, the delete is refused).
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and holds is not None and holds(dict(row)):
                raise JobBusy(f"job {job_id} is {row['status']} (resumed meanwhile?); "
                              f"`trainguard stop {job_id}` first")
            self._db.execute("DELETE FROM attempts WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    @_translated
    def resolve(self, prefix: str) -> str:
        """The full id of the job whose id starts with ``prefix``.

        Raises:
            JobNotFound: no job, or several, match.
        """
        rows = self._db.execute("SELECT id FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY "
                                "created", (len(prefix), prefix)).fetchall()
        if not prefix or not rows:
            raise JobNotFound(f"no job {prefix!r}; `trainguard ps` lists the jobs")
        if len(rows) > 1:
            raise JobNotFound(f"job id {prefix!r} is ambiguous "
                              f"({', '.join(r['id'] for r in rows)}); give more characters")
        return rows[0]["id"]

    @_translated
    def get(self, job_id: str) -> dict:
        """The job's row as a dict (with ``spec`` parsed)."""
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}; `trainguard ps` lists the jobs")
        job = dict(row)
        job["spec"] = JobSpec.from_json(job["spec"]) if job["spec"] else None
        return job

    @_translated
    def stop_requested(self, job_id: str) -> int:
        """The job's stop request (0 none, 1 graceful, 2 now): one column, no spec parse,
        cheap enough for the supervisor's poll loop."""
        row = self._db.execute("SELECT stop_requested FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
        return (row[0] or 0) if row else 0

    @_translated
    def all(self) -> list[dict]:
        """Every job, newest first (spec left as JSON text)."""
        return [dict(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY created DESC")]

    @_translated
    def update(self, job_id: str, **fields) -> None:
        """Set columns of a job (and its ``updated`` time)."""
        fields["updated"] = time.time()
        names = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    @_translated
    def start_attempt(self, job_id: str, n: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO attempts (job_id, n, started) VALUES (?, ?, ?)",
                         (job_id, n, time.time()))

    @_translated
    def end_attempt(self, job_id: str, n: int, exit_code: int | None, reason: str) -> None:
        self._db.execute("UPDATE attempts SET ended = ?, exit_code = ?, reason = ? "
                         "WHERE job_id = ? AND n = ?", (time.time(), exit_code, reason, job_id, n))

    @_translated
    def sql(self, statement: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Run one statement on the table's database (backends keep their own tables
        beside ``jobs``, e.g. ``modal_calls``); its rows."""
        return self._db.execute(statement, params).fetchall()

    @_translated
    def attempts(self, job_id: str) -> list[Attempt]:
        rows = self._db.execute("SELECT n, started, ended, exit_code, reason FROM attempts "
                                "WHERE job_id = ? ORDER BY n", (job_id,))
        return [Attempt(**dict(r)) for r in rows]

    def close(self) -> None:
        self._db.close()
