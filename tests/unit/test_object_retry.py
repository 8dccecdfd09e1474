"""Transient object-store errors are retried with exponential backoff and jitter, within a
time budget (issue 14, item 11). The clock and the sleep are fakes: no test waits."""

from __future__ import annotations

import pytest
import torch

from trainguard import CheckpointManager
from trainguard.errors import CheckpointError, StoreError
from trainguard.store.object import ObjectStore
from trainguard.store.retry import DEFAULT_BUDGET, Backoff, is_transient


class FakeTime:
    """A clock that only moves when something sleeps; ``on_sleep`` sees the new time."""

    def __init__(self, on_sleep=None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(self.now - 1000.0)


def _transient() -> Exception:
    from obstore.exceptions import GenericError

    return GenericError("Generic S3 error: Error performing PUT http://x/b/k - Server "
                        "returned non-2xx status code: 503 Service Unavailable")


def test_backoff_grows_exponentially_with_jitter_and_stops_at_its_budget():
    fake = FakeTime()
    backoff = Backoff(budget=120.0, first_delay=0.5, max_delay=20.0, sleep=fake.sleep,
                      clock=fake.clock, seed=7)
    calls = []

    def always_down():
        calls.append(fake.now)
        raise _transient()

    with pytest.raises(StoreError, match=r"retry budget of 120 s") as raised:
        backoff.call(always_down, "cannot write s3://b/k")
    assert "503" in str(raised.value) and "cannot write s3://b/k" in str(raised.value)
    assert sum(fake.sleeps) <= 120.0 and sum(fake.sleeps) > 60.0  # used most of the budget
    assert len(calls) == len(fake.sleeps) + 1
    for n, delay in enumerate(fake.sleeps):
        ceiling = min(20.0, 0.5 * 2 ** n)
        assert ceiling / 2 <= delay <= ceiling  # exponential, capped, jittered in its band
    assert len(set(fake.sleeps[-4:])) == 4  # the capped delays still differ: jitter


def test_a_call_that_recovers_returns_its_value():
    fake = FakeTime()
    backoff = Backoff(sleep=fake.sleep, clock=fake.clock, seed=1)
    answers = iter([_transient(), ConnectionResetError("reset"), "ok"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert backoff.call(flaky, "cannot read") == "ok" and len(fake.sleeps) == 2


@pytest.mark.parametrize("error", ["permission", "not-found", "exists", "bad-request",
                                   "value"])
def test_permanent_errors_are_raised_at_once(error):
    from obstore import exceptions as obx

    exc = {"permission": obx.PermissionDeniedError("denied"),
           "not-found": FileNotFoundError("gone"),
           "exists": obx.AlreadyExistsError("exists"),
           "bad-request": obx.GenericError("Server returned non-2xx status code: 400 Bad"),
           "value": ValueError("a bug")}[error]
    assert not is_transient(exc)
    fake = FakeTime()

    def fails():
        raise exc

    with pytest.raises(type(exc)):
        Backoff(sleep=fake.sleep, clock=fake.clock).call(fails, "cannot write")
    assert fake.sleeps == []


def test_throttling_and_timeouts_are_transient():
    from obstore import exceptions as obx

    assert is_transient(obx.GenericError("Server returned non-2xx status code: 429 Too Many"))
    assert is_transient(obx.GenericError("HTTP error: error sending request"))
    assert is_transient(TimeoutError("timed out"))
    wrapped = StoreError("cannot write the lease")
    wrapped.__cause__ = _transient()
    assert is_transient(wrapped)


def test_the_default_budget_is_about_two_minutes_and_configurable(monkeypatch, s3_env):
    assert 100 <= DEFAULT_BUDGET <= 180
    assert ObjectStore(f"s3://{s3_env}/r").retry.budget == DEFAULT_BUDGET
    monkeypatch.setenv("TRAINGUARD_RETRY_BUDGET", "30")
    assert ObjectStore(f"s3://{s3_env}/r").retry.budget == 30.0
    monkeypatch.setenv("TRAINGUARD_RETRY_BUDGET", "soon")
    with pytest.raises(StoreError, match="TRAINGUARD_RETRY_BUDGET"):
        ObjectStore(f"s3://{s3_env}/r")
    with pytest.raises(ValueError, match="budget"):
        Backoff(budget=-1)


@pytest.fixture
def proxy(s3_server, s3_env, monkeypatch):
    from tests.faultproxy import FaultProxy

    fault_proxy = FaultProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    monkeypatch.setenv("TRAINGUARD_LEASE_TTL", "600")
    yield fault_proxy
    fault_proxy.unblock()
    fault_proxy.stop()


def _manager(bucket: str, fake: FakeTime, budget: float = 120.0) -> CheckpointManager:
    backoff = Backoff(budget=budget, sleep=fake.sleep, clock=fake.clock, seed=3)
    # obstore's own retries off: the outer backoff is what is tested, and it sleeps on
    # the fake clock.
    return CheckpointManager(ObjectStore(f"s3://{bucket}/run", max_retries=0, retry=backoff))


def test_a_save_rides_out_a_short_outage(s3_env, proxy):
    fake = FakeTime(on_sleep=lambda elapsed: proxy.unblock() if elapsed >= 30 else None)
    mgr = _manager(s3_env, fake)
    mgr.save(1, {"w": torch.ones(8)}, blocking=True)
    proxy.block(f"/{s3_env}/run")  # the endpoint answers 503 for 30 (fake) seconds
    mgr.save(2, {"w": torch.full((8,), 2.0)}, blocking=True)
    assert proxy.faults > 0 and sum(fake.sleeps) >= 30
    assert [(i.step, i.valid) for i in mgr.list()] == [(1, True), (2, True)]
    assert mgr.verify(2).valid
    mgr.close()


def test_an_outage_past_the_budget_fails_the_save_and_keeps_the_previous_checkpoint(
        s3_env, proxy):
    fake = FakeTime()
    mgr = _manager(s3_env, fake, budget=20.0)
    mgr.save(1, {"w": torch.ones(8)}, blocking=True)
    proxy.block(f"/{s3_env}/run")
    with pytest.raises((CheckpointError, StoreError)) as raised:
        mgr.save(2, {"w": torch.full((8,), 2.0)}, blocking=True)
    chain, exc = [], raised.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    assert any("retry budget of 20 s" in text for text in chain), chain
    assert sum(fake.sleeps) <= 20.0
    proxy.unblock()
    reader = CheckpointManager(f"s3://{s3_env}/run")
    assert [i.step for i in reader.list() if i.valid] == [1]
    target = {"w": torch.zeros(8)}
    assert reader.restore(target) == 1 and torch.equal(target["w"], torch.ones(8))


def test_create_whose_answer_was_lost_counts_as_done(s3_env, proxy):
    """The create landed, its answer was lost, obstore sent it again and was told the key
    exists: it is this call's own object, not another writer's."""
    store = ObjectStore(f"s3://{s3_env}/run", retry=Backoff(sleep=FakeTime().sleep))
    proxy.fail_next(1, "lost", match="manifest.json", method="PUT")
    assert store.create("checkpoints/step-000000001/manifest.json", b"ours") == 4
    assert proxy.faults == 1
    with pytest.raises(FileExistsError):  # and someone else's still refuses
        store.create("checkpoints/step-000000001/manifest.json", b"theirs")
