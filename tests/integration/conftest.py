"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest

from tests.integration.run_scripts.attempts import ForkServer, shared_server


@pytest.fixture
def fork_server() -> ForkServer:
    """The session's fork server: torch imported once, each attempt a fork."""
    return shared_server()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh ``TRAINGUARD_HOME`` (job table and logs) for the test and its processes."""
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
