"""The job table: private to its owner, and a broken one is one line, never a traceback."""

from __future__ import annotations

import sqlite3

import pytest
from click.testing import CliRunner

from trainguard.cli import cli
from trainguard.errors import JobTableError
from trainguard.launch import JobSpec, JobTable


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_table_and_its_wal_files_are_readable_by_their_owner_only(home, tmp_path):
    home.mkdir()
    (home / "jobs.db").touch(mode=0o644)  # a table made by an older trainguard
    script = tmp_path / "t.py"
    script.write_text("print(1)\n")
    table = JobTable()
    table.create(JobSpec(str(script), env={"API_KEY": "sekrit"}))
    for path in home.glob("jobs.db*"):
        assert path.stat().st_mode & 0o077 == 0, path


@pytest.mark.parametrize("damage, needle", [
    (lambda db: db.write_bytes(b"this is not sqlite at all" * 100), "mv "),
    (lambda db: db.mkdir(), "jobs.db"),
])
def test_a_broken_table_is_one_line_naming_the_file_and_the_fix(home, tmp_path, damage,
                                                                 needle):
    home.mkdir()
    damage(home / "jobs.db")
    script = tmp_path / "t.py"
    script.write_text("print(1)\n")
    for args in (["ps"], ["status", "abc"], ["run", str(script), "--detach",
                                               "--no-preflight"]):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == JobTableError.exit_code, (args, out.output)
        assert "Traceback" not in out.output
        assert f"the job table {home / 'jobs.db'} cannot be used" in out.output or \
            f"the job table {home / 'jobs.db'} cannot be opened" in out.output
        assert needle in out.output
        assert not isinstance(out.exception, sqlite3.Error)


def test_a_table_corrupted_after_opening_still_fails_in_one_line(home, monkeypatch):
    table = JobTable()

    def corrupt(*args, **kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(table, "_db", type("Db", (), {"execute": staticmethod(corrupt)})())
    from trainguard.launch.jobs import JobTableError

    with pytest.raises(JobTableError, match="malformed.*mv "):
        table.all()
