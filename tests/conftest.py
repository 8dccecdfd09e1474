"""Shared fixtures: small deterministic training states."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# The shipped conformance suite's asserts get pytest's detailed messages (it is imported
# by the backends' test modules, after this).
pytest.register_assert_rewrite("trainguard.testing.store_conformance")

# The suite never reads the developer's own Modal profile (modal reads it when first
# imported): credentials come from each test's environment, as in CI.
os.environ.setdefault("MODAL_CONFIG_PATH", os.path.join(tempfile.gettempdir(),
                                                        "trainguard-tests-no-modal.toml"))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))


def train_steps(model, optimizer, scheduler=None, steps: int = 3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.fixture
def trained():
    """A model, AdamW and a scheduler after a few real steps (optimizer state populated)."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train_steps(model, optimizer, scheduler)
    return model, optimizer, scheduler


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session (real HTTP, real multipart)."""
    from tests.s3server import MotoServer

    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, request):
    """Environment pointing obstore at the local server, and a fresh bucket."""
    import re

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "b"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    s3_server.create_bucket(bucket)
    return bucket


# -- the fuzz suite's counts, printed at the end (tests/fuzz/harness.py counts them) -------
# Under pytest-xdist the cases run in workers: each hands its counts to the controller.
def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from tests.fuzz.harness import CASES, FAILURES

        workeroutput["fuzz"] = [dict(CASES), dict(FAILURES)]


_FUZZ_GATHERED: list[dict] = []

try:
    import xdist  # noqa: F401

    def pytest_testnodedown(node, error):
        _FUZZ_GATHERED.append(node.workeroutput.get("fuzz", [{}, {}]))
except ImportError:  # pragma: no cover - the dev extra installs xdist
    pass


def pytest_terminal_summary(terminalreporter):
    from collections import Counter

    from tests.fuzz.harness import CASES, EXAMPLES, FAILURES

    cases, failures = Counter(CASES), Counter(FAILURES)
    for worker_cases, worker_failures in _FUZZ_GATHERED:
        cases.update(worker_cases)
        failures.update(worker_failures)
    if cases:
        detail = ", ".join(f"{name} {count}" for name, count in sorted(cases.items()))
        terminalreporter.write_line(
            f"fuzz: {sum(cases.values())} cases run ({detail}), {sum(failures.values())} "
            f"failing cases (TRAINGUARD_FUZZ_EXAMPLES={EXAMPLES} per test)")
