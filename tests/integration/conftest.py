"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest

from tests.integration.run_scripts.attempts import PRELOAD, ForkServer


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    """One fork server for the session: torch imported once, each attempt a fork."""
    server = ForkServer(tmp_path_factory.mktemp("forks"), PRELOAD)
    yield server
    server.close()
