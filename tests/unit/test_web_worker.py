"""The queue worker on a real temp store, with deployments that run no Ansible."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import pytest

from fraisier.errors import SourceError, StoreError
from fraisier.store import Store
from fraisier.worker import Heartbeat, QueueWorker


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "fraisier.db") as opened:
        yield opened


def enqueue(store, fraise, environment="production", delivery=None, commit="ab" * 20):
    queued = store.enqueue_from_webhook(
        provider="github",
        delivery_id=delivery or f"{fraise}-{environment}-{time.monotonic_ns()}",
        event_type="push",
        targets=[(fraise, environment)],
        commit=commit,
        branch="main",
    )
    return queued[0]


class FakeDeployment:
    """Moves its claimed row like Deployment does, and blocks until released or canceled."""

    registry: ClassVar[dict[int, FakeDeployment]] = {}
    lock = threading.Lock()
    active_pairs: ClassVar[list[tuple[str, str]]] = []
    overlaps: ClassVar[list[tuple[str, str]]] = []
    most_at_once = 0

    def __init__(self, config, fraise, environment, *, store, deployment_id, **kwargs):
        self.store = store
        self.pair = (fraise, environment)
        self.deployment_id = deployment_id
        self.kwargs = kwargs
        self.release = threading.Event()
        self.reason = None
        FakeDeployment.registry[deployment_id] = self

    def cancel(self, reason="canceled", *, status="canceled"):
        self.reason = reason
        self.release.set()

    def run(self):
        cls = FakeDeployment
        with cls.lock:
            if self.pair in cls.active_pairs:
                cls.overlaps.append(self.pair)
            cls.active_pairs.append(self.pair)
            cls.most_at_once = max(cls.most_at_once, len(cls.active_pairs))
        try:
            # What Deployment does once it holds the lock: the claimed row is already
            # running under this process, so only its fields change.
            self.store.update_deployment(self.deployment_id, release_id="r-fake")
            self.release.wait(20)
            if self.kwargs.get("commit") == "ee" * 20:
                raise SourceError("fetch of repo failed: commit not found")
            status = "canceled" if self.reason else "successful"
            self.store.transition(self.deployment_id, status, error=self.reason)
            return type("Result", (), {"status": status})()
        finally:
            with cls.lock:
                cls.active_pairs.remove(self.pair)


@pytest.fixture
def fake():
    FakeDeployment.registry = {}
    FakeDeployment.active_pairs = []
    FakeDeployment.overlaps = []
    FakeDeployment.most_at_once = 0
    return FakeDeployment


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def status_of(store, deployment_id):
    return store.deployment(deployment_id)["status"]


def test_a_queued_row_with_an_owner_is_never_claimed(store):
    """A CLI deploy waiting for its lock owns its queued row: the queue must leave it."""
    waiting = store.create_deployment(
        fraise="api", environment="production", trigger="cli", owner="host:1"
    )
    assert store.claim_next(owner="me:1") is None
    assert status_of(store, waiting) == "queued"
    queued = enqueue(store, "etl")
    assert store.claim_next(owner="me:1")["id"] == queued


def test_worker_runs_pairs_in_parallel_up_to_its_size_never_one_pair_twice(store, fake):
    worker = QueueWorker(None, store, workers=2, poll_interval=0.05, deployment_factory=fake)
    first_api = enqueue(store, "api")
    etl = enqueue(store, "etl")
    worker_ids = [first_api, etl]
    worker.start()
    try:
        wait_for(lambda: set(fake.registry) == set(worker_ids))
        assert {status_of(store, i) for i in worker_ids} == {"running"}
        # A third pair waits: both threads are busy.
        web = enqueue(store, "web")
        # A newer push of a running pair is queued behind it, not run beside it.
        second_api = enqueue(store, "api")
        time.sleep(0.3)
        assert status_of(store, web) == "queued"
        assert status_of(store, second_api) == "queued"
        fake.registry[first_api].release.set()
        wait_for(lambda: status_of(store, first_api) == "successful")
        wait_for(lambda: len(fake.registry) == 3)
        for deployment in list(fake.registry.values()):
            deployment.release.set()
        wait_for(lambda: len(fake.registry) == 4)
        fake.registry[second_api].release.set()
        wait_for(
            lambda: all(
                status_of(store, i) == "successful" for i in (first_api, etl, web, second_api)
            )
        )
    finally:
        worker.stop(grace=1)
    assert fake.overlaps == []
    assert fake.most_at_once == 2
    row = store.deployment(second_api)
    assert row["owner"] == worker.owner
    assert fake.registry[second_api].kwargs["wait"] is True


def test_deployment_that_raises_ends_failed_with_its_message(store, fake):
    worker = QueueWorker(None, store, workers=1, poll_interval=0.05, deployment_factory=fake)
    deployment_id = enqueue(store, "api", commit="ee" * 20)
    worker.start()
    try:
        wait_for(lambda: deployment_id in fake.registry)
        fake.registry[deployment_id].release.set()
        wait_for(lambda: status_of(store, deployment_id) == "failed")
    finally:
        worker.stop(grace=1)
    assert "commit not found" in store.deployment(deployment_id)["error"]


def test_deployment_that_cannot_even_start_does_not_stay_running(store):
    def broken(*_args, **_kwargs):
        raise StoreError("config changed: unknown fraise 'api'")

    worker = QueueWorker(None, store, workers=1, poll_interval=0.05, deployment_factory=broken)
    deployment_id = enqueue(store, "api")
    worker.start()
    try:
        wait_for(lambda: status_of(store, deployment_id) == "failed")
    finally:
        worker.stop(grace=1)
    assert "unknown fraise" in store.deployment(deployment_id)["error"]


def test_stop_cancels_what_still_runs_after_the_grace(store, fake):
    worker = QueueWorker(None, store, workers=1, poll_interval=0.05, deployment_factory=fake)
    deployment_id = enqueue(store, "api")
    worker.start()
    wait_for(lambda: deployment_id in fake.registry)
    assert worker.alive()
    worker.stop(grace=0.2)
    assert status_of(store, deployment_id) == "canceled"
    assert "stopping" in store.deployment(deployment_id)["error"]
    assert not worker.alive()


def test_start_marks_deployments_of_dead_processes_interrupted(store, fake):
    deployment_id = enqueue(store, "api")
    # Claimed by a process that no longer exists (pid beyond any real one).
    store.claim_next(owner=f"{__import__('socket').gethostname()}:999999999")
    worker = QueueWorker(None, store, workers=1, poll_interval=0.05, deployment_factory=fake)
    worker.start()
    worker.stop(grace=0.1)
    assert status_of(store, deployment_id) == "interrupted"


def test_heartbeat_is_shared_with_forked_children():
    import os

    heartbeat = Heartbeat()
    assert heartbeat.read()[0] == float("inf")
    pid = os.fork()
    if pid == 0:
        heartbeat.beat(3)
        os._exit(0)
    os.waitpid(pid, 0)
    age, threads = heartbeat.read()
    assert threads == 3
    assert age < 5
