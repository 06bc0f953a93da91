"""Locks, crash recovery, webhook deduplication and the deployment queue."""

from __future__ import annotations

import multiprocessing
import os
import threading
from datetime import datetime, timedelta

import pytest

from fraisier.errors import LockedError, StoreError
from fraisier.store import BatchedWriteError, Store, local_process_alive, owner_id


class Clock:
    def __init__(self):
        self.now = datetime(2026, 11, 27, 3, 45, 1)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "fraisier.db"


@pytest.fixture
def store(db_path):
    with Store.open(db_path) as opened:
        opened.clock = Clock()
        yield opened


def webhook_fields(delivery_id="d-1", commit="c1", **changes):
    fields = {
        "provider": "github",
        "delivery_id": delivery_id,
        "event_type": "push",
        "ref": "refs/heads/main",
        "branch": "main",
        "commit": commit,
        "repository": "acme/api",
        "pusher": "alice",
        "payload_sha256": "ab" * 32,
    }
    fields.update(changes)
    return fields


# ---------------------------------------------------------------- locks


def test_lock_acquire_contend_expire_release(store):
    store.acquire_lock("api", "production", holder="h:1", deployment_id=None, lease_seconds=60)
    holder = store.lock_holder("api", "production")
    assert holder["holder"] == "h:1" and holder["expires_at"] == "2026-11-27T03:46:01Z"

    deployment_id = store.create_deployment(fraise="api", environment="production", trigger="cli")
    store.release_lock("api", "production", holder="h:1")
    store.acquire_lock(
        "api", "production", holder="h:1", deployment_id=deployment_id, lease_seconds=60
    )
    with pytest.raises(LockedError) as caught:
        store.acquire_lock("api", "production", holder="h:2", deployment_id=None, lease_seconds=60)
    assert str(caught.value) == (
        f"api/production is being deployed by h:1 (deployment {deployment_id}, since "
        "2026-11-27T03:45:01Z); wait for it or use --wait"
    )
    # Another pair is independent.
    store.acquire_lock("api", "staging", holder="h:2", lease_seconds=60)

    assert store.renew_lock("api", "production", holder="h:1", lease_seconds=60)
    assert not store.renew_lock("api", "production", holder="h:2", lease_seconds=60)
    store.clock.tick(59)
    with pytest.raises(LockedError):
        store.acquire_lock("api", "production", holder="h:2", lease_seconds=60)
    store.clock.tick(2)
    assert store.lock_holder("api", "production") is None
    assert not store.renew_lock("api", "production", holder="h:1", lease_seconds=60)
    store.acquire_lock("api", "production", holder="h:2", lease_seconds=60)
    assert store.lock_holder("api", "production")["holder"] == "h:2"

    store.release_lock("api", "production", holder="h:1")  # not the holder: no effect
    assert store.lock_holder("api", "production")["holder"] == "h:2"
    store.release_lock("api", "production", holder="h:2")
    assert store.lock_holder("api", "production") is None


def test_lock_is_reentrant_for_its_holder(store):
    store.acquire_lock("api", "production", holder="h:1", lease_seconds=10)
    store.clock.tick(5)
    store.acquire_lock("api", "production", holder="h:1", lease_seconds=10)
    assert store.lock_holder("api", "production")["expires_at"] == "2026-11-27T03:45:16Z"


def test_only_one_of_many_threads_gets_the_lock(db_path):
    with Store.open(db_path):
        pass
    barrier = threading.Barrier(6)
    winners, losers = [], []

    def contend(n: int) -> None:
        with Store.open(db_path) as mine:
            barrier.wait()
            try:
                mine.acquire_lock("api", "production", holder=f"h:{n}", lease_seconds=60)
                winners.append(n)
            except LockedError:
                losers.append(n)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(losers) == 5


# ---------------------------------------------------------------- crash recovery


def test_mark_interrupted_frees_dead_owners_only(store):
    dead = store.create_deployment(fraise="api", environment="production", trigger="cli")
    store.transition(dead, "running", owner="box:111")
    alive = store.create_deployment(fraise="api", environment="staging", trigger="cli")
    store.transition(alive, "running", owner="box:222")
    queued = store.create_deployment(fraise="web", environment="production", trigger="cli")
    store.acquire_lock("api", "production", holder="box:111", deployment_id=dead, lease_seconds=60)
    store.acquire_lock("api", "staging", holder="box:222", deployment_id=alive, lease_seconds=60)

    asked = []

    def is_alive(owner: str) -> bool:
        asked.append(owner)
        return owner == "box:222"

    assert store.mark_interrupted(is_alive) == [dead]
    assert sorted(asked) == ["box:111", "box:222"]
    row = store.deployment(dead)
    assert row["status"] == "interrupted"
    assert row["error"] == "the process that ran it (box:111) is gone"
    assert row["completed_at"] is not None
    assert row["transitions"][-1]["to_status"] == "interrupted"
    assert store.lock_holder("api", "production") is None
    assert store.lock_holder("api", "staging")["holder"] == "box:222"
    assert store.deployment(alive)["status"] == "running"
    assert store.deployment(queued)["status"] == "queued"
    assert store.mark_interrupted(is_alive) == []


def test_local_process_alive():
    me = owner_id()
    assert me.endswith(f":{os.getpid()}")
    assert local_process_alive(me)
    child = multiprocessing.get_context("fork").Process(target=int)
    child.start()
    child.join()
    assert not local_process_alive(me.rsplit(":", 1)[0] + f":{child.pid}")
    assert local_process_alive("some-other-host:1")
    assert not local_process_alive("")


# ---------------------------------------------------------------- webhooks


def test_record_webhook_event_dedupes(store):
    first, new = store.record_webhook_event(**webhook_fields(), outcome="accepted")
    assert new
    again, new_again = store.record_webhook_event(**webhook_fields(), outcome="accepted")
    assert (again, new_again) == (first, False)
    other, new_other = store.record_webhook_event(
        **webhook_fields(provider="gitlab"), outcome="accepted"
    )
    assert new_other and other != first
    # Rejected deliveries without an id are all kept.
    ids = {
        store.record_webhook_event(
            **webhook_fields(delivery_id=None), outcome="rejected", reason="bad signature"
        )
        for _ in range(3)
    }
    assert len(ids) == 3 and all(is_new for _, is_new in ids)
    rows = store.webhook_events()
    assert rows[0]["outcome"] == "rejected" and rows[0]["received_at"] == "2026-11-27T03:45:01Z"
    assert len(rows) == 5


def test_webhook_dedupe_under_concurrency(db_path):
    with Store.open(db_path):
        pass
    barrier = threading.Barrier(8)
    results = []

    def deliver() -> None:
        with Store.open(db_path) as mine:
            barrier.wait()
            results.append(
                mine.enqueue_from_webhook(
                    **webhook_fields("same-delivery"), targets=[("api", "production")]
                )
            )

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.webhook_event_id for r in results}) == 1
    with Store.open(db_path, readonly=True) as reader:
        assert len(reader.history()) == 1
        assert len(reader.webhook_events()) == 1


def test_enqueue_from_webhook_queues_and_supersedes(store):
    first = store.enqueue_from_webhook(
        **webhook_fields("d-1", "c1"),
        targets=[("api", "production"), ("api", "staging")],
        commit_message="First",
    )
    assert len(first) == 2 and not first.duplicate
    row = store.deployment(first[0])
    assert (row["status"], row["trigger"], row["commit"], row["branch"]) == (
        "queued",
        "webhook",
        "c1",
        "main",
    )
    assert row["webhook_event_id"] == first.webhook_event_id
    assert row["requested_by"] == "alice" and row["commit_message"] == "First"

    # The staging one starts running before the next push: only production can be superseded.
    store.transition(first[1], "running", owner="w:1")
    manual = store.create_deployment(fraise="api", environment="production", trigger="cli")
    second = store.enqueue_from_webhook(
        **webhook_fields("d-2", "c2"), targets=[("api", "production"), ("api", "staging")]
    )
    old = store.deployment(first[0])
    assert old["status"] == "superseded"
    assert old["error"] == f"superseded by deployment {second[0]} (commit c2)"
    assert old["completed_at"] is not None
    assert store.deployment(first[1])["status"] == "running"
    assert store.deployment(manual)["status"] == "queued"
    assert [store.deployment(i)["status"] for i in second] == ["queued", "queued"]

    duplicate = store.enqueue_from_webhook(
        **webhook_fields("d-2", "c2"), targets=[("api", "production")]
    )
    assert duplicate == [] and duplicate.duplicate
    assert duplicate.webhook_event_id == second.webhook_event_id


def test_enqueue_without_targets_records_ignored(store):
    result = store.enqueue_from_webhook(**webhook_fields("d-9"), targets=[])
    assert result == [] and not result.duplicate
    assert store.webhook_events()[0]["outcome"] == "ignored"


def test_enqueue_is_one_transaction(store):
    with pytest.raises(TypeError):
        store.enqueue_from_webhook(**webhook_fields("d-x"), targets=[("api", "production"), None])
    assert store.history() == []
    assert store.webhook_events() == []


# ---------------------------------------------------------------- queue


def test_claim_next_order_and_pair_exclusion(store):
    a1 = store.create_deployment(fraise="api", environment="production", trigger="webhook")
    a2 = store.create_deployment(fraise="api", environment="production", trigger="webhook")
    b1 = store.create_deployment(fraise="web", environment="production", trigger="webhook")
    c1 = store.create_deployment(fraise="etl", environment="production", trigger="webhook")
    store.acquire_lock("etl", "production", holder="cli:9", lease_seconds=60)

    claimed = store.claim_next(owner="w:1")
    assert claimed["id"] == a1 and claimed["status"] == "running"
    assert claimed["owner"] == "w:1" and claimed["started_at"] is not None
    assert claimed["transitions"][-1]["detail"] == "claimed by w:1"
    # a2 waits for a1 (same pair running); etl waits for its lock.
    assert store.claim_next(owner="w:2")["id"] == b1
    assert store.claim_next(owner="w:2") is None
    store.transition(a1, "successful")
    assert store.claim_next(owner="w:1", exclude_pairs=[("api", "production")]) is None
    assert store.claim_next(owner="w:1")["id"] == a2
    store.clock.tick(61)
    assert store.claim_next(owner="w:1")["id"] == c1


def _claim_all(path: str, owner: str, start, out) -> None:
    with Store.open(path) as mine:
        start.wait()
        claimed = []
        while True:
            row = mine.claim_next(owner=owner)
            if row is None:
                break
            claimed.append(row["id"])
            mine.transition(row["id"], "successful")
        out.put(claimed)


def test_two_claimer_processes_never_claim_the_same_deployment(db_path):
    with Store.open(db_path) as store:
        ids = {
            store.create_deployment(
                fraise=f"f{n % 10}", environment="production", trigger="webhook"
            )
            for n in range(60)
        }
    context = multiprocessing.get_context("fork")
    start, out = context.Event(), context.Queue()
    workers = [
        context.Process(target=_claim_all, args=(str(db_path), f"w:{n}", start, out))
        for n in range(2)
    ]
    for worker in workers:
        worker.start()
    start.set()
    claimed = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)) == 60
    assert set(everything) == ids
    with Store.open(db_path, readonly=True) as reader:
        assert {r["status"] for r in reader.history(limit=None)} == {"successful"}


def test_enqueue_records_the_same_rows_as_a_deployment_created_by_hand(store):
    queued = store.enqueue_from_webhook(
        **webhook_fields("d-1", "c1"),
        targets=[("api", "production")],
        commit_message="First",
        options={"tags": ["web"]},
    )
    row = store.deployment(queued[0])
    assert row["options"] == {"tags": ["web"]}
    assert (row["dry_run"], row["owner"], row["started_at"], row["completed_at"]) == (
        False,
        None,
        None,
        None,
    )
    assert row["created_at"] == "2026-11-27T03:45:01Z"
    assert [(t["from_status"], t["to_status"]) for t in row["transitions"]] == [(None, "queued")]
    event = store.webhook_events()[0]
    assert (event["id"], event["outcome"], event["reason"]) == (
        queued.webhook_event_id,
        "accepted",
        None,
    )
    assert (event["delivery_id"], event["commit"], event["payload_sha256"]) == (
        "d-1",
        "c1",
        "ab" * 32,
    )


def test_supersede_keeps_dry_runs_and_records_the_transition(store):
    live = store.enqueue_from_webhook(**webhook_fields("d-1"), targets=[("api", "production")])
    dry = store.enqueue_from_webhook(
        **webhook_fields("d-2"), targets=[("api", "production")], dry_run=True
    )
    store.clock.tick(5)
    newer = store.enqueue_from_webhook(
        **webhook_fields("d-3", "0123456789abcdef"), targets=[("api", "production")]
    )
    old = store.deployment(live[0])
    assert old["status"] == "superseded"
    assert old["completed_at"] == "2026-11-27T03:45:06Z"
    assert old["transitions"][-1] == {
        "from_status": "queued",
        "to_status": "superseded",
        "detail": f"superseded by deployment {newer[0]} (commit 0123456789ab)",
        "created_at": "2026-11-27T03:45:06Z",
    }
    # A dry run is superseded only by a newer dry run of the same pair.
    assert store.deployment(dry[0])["status"] == "queued"


@pytest.mark.parametrize("returning", [True, False])
def test_webhook_path_with_and_without_returning(store, returning):
    # SQLite before 3.35 has no RETURNING: ids come from lastrowid, superseded rows are read
    # first. Both paths must give the same results.
    store._returning = returning
    first = store.enqueue_from_webhook(**webhook_fields("d-1"), targets=[("api", "production")])
    second = store.enqueue_from_webhook(**webhook_fields("d-2"), targets=[("api", "production")])
    again = store.enqueue_from_webhook(**webhook_fields("d-2"), targets=[("api", "production")])
    assert len(first) == len(second) == 1 and second[0] > first[0]
    assert again.duplicate and again.webhook_event_id == second.webhook_event_id
    assert store.record_webhook_event(**webhook_fields("d-1"), outcome="accepted") == (
        first.webhook_event_id,
        False,
    )
    assert [r["status"] for r in store.history()] == ["queued", "superseded"]
    rejected = store.record_webhook_event(
        **webhook_fields(delivery_id=None), outcome="rejected", reason="bad signature"
    )
    assert rejected[1] and rejected[0] > second.webhook_event_id


def test_deferred_checkpoints_leave_the_wal_to_checkpoint(db_path):
    with Store.open(db_path) as writer:
        writer.defer_checkpoints(5000)
        assert writer.db.execute_sql("PRAGMA wal_autocheckpoint").fetchone()[0] == 5000
        seen = []
        # A connection opened later, by another thread, gets the setting too.
        thread = threading.Thread(
            target=lambda: seen.append(
                writer.db.execute_sql("PRAGMA wal_autocheckpoint").fetchone()[0]
            )
        )
        thread.start()
        thread.join()
        assert seen == [5000]
        for n in range(50):
            writer.enqueue_from_webhook(**webhook_fields(f"d-{n}"), targets=[("api", "production")])
        frames, copied = writer.checkpoint()
        assert frames > 0 and copied == frames
        assert writer.checkpoint() == (frames, frames)
    with Store.open(db_path, readonly=True) as reader:
        assert reader.checkpoint() == (0, 0)
        assert len(reader.webhook_events()) == 50


def test_batched_webhook_writes_commit_together_and_fail_alone(store, db_path):
    good = store.prepare_enqueue(**webhook_fields("d-1"), targets=[("api", "production")])
    again = store.prepare_enqueue(**webhook_fields("d-1"), targets=[("api", "production")])

    def broken(run):
        # A write that fails half-way: its savepoint must undo the row it wrote.
        run.execute(
            "INSERT INTO tb_webhook_events (provider, delivery_id, outcome, received_at) "
            "VALUES ('github', 'half-written', 'accepted', '2026-11-27 03:45:01.000000')"
        )
        run.execute("INSERT INTO no_such_table VALUES (1)")

    record = store.prepare_webhook_record(**webhook_fields("d-2"), outcome="ignored", reason="r")
    results = store.run_webhook_writes([good, broken, again, record])

    assert not results[0].duplicate and len(results[0]) == 1
    assert isinstance(results[1], BatchedWriteError)
    assert isinstance(results[1].error, StoreError)
    assert "no_such_table" in str(results[1].error)
    # The second delivery of d-1 in the same batch sees the first one: a duplicate.
    assert results[2].duplicate and results[2].webhook_event_id == results[0].webhook_event_id
    assert results[3][1] is True
    with Store.open(db_path, readonly=True) as reader:
        ids = sorted(row["delivery_id"] for row in reader.webhook_events())
        assert ids == ["d-1", "d-2"]
        assert [row["status"] for row in reader.history()] == ["queued"]


def test_a_single_failing_webhook_write_raises_and_leaves_nothing(store, db_path):
    def broken(run):
        run.execute(
            "INSERT INTO tb_webhook_events (provider, delivery_id, outcome, received_at) "
            "VALUES ('github', 'half-written', 'accepted', '2026-11-27 03:45:01.000000')"
        )
        run.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(StoreError, match="no_such_table"):
        store.run_webhook_writes([broken])
    with Store.open(db_path, readonly=True) as reader:
        assert reader.webhook_events() == []
