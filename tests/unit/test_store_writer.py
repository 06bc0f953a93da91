"""The batched event writer: runner events in, bounded and scrubbed rows out."""

from __future__ import annotations

import copy
import json

import pytest

from fraisier.errors import StoreError
from fraisier.store import Store, host_stats_from_runner
from fraisier.store.constants import MAX_RESULT_BYTES, MAX_STDOUT_BYTES
from fraisier.store.writer import bound_text, event_row

# Shapes recorded from ansible-runner 2.4 / ansible-core 2.19 on a localhost playbook.
RUNNER_ON_OK = {
    "uuid": "4289c51a-1902-469a-86b1-5347c5df21ff",
    "counter": 13,
    "stdout": "\x1b[0;33mchanged: [localhost]\x1b[0m",
    "start_line": 15,
    "end_line": 16,
    "runner_ident": "54193050-9e49-41cf-98c4-a78068ca89df",
    "event": "runner_on_ok",
    "pid": 31012,
    "created": "2026-11-27T03:49:26.540351+00:00",
    "parent_uuid": "02fc0000-0001-50c1-fe48-000000000006",
    "event_data": {
        "playbook": "/tmp/rec/play.yml",
        "play": "web",
        "play_pattern": "web",
        "task": "Copy a file",
        "task_action": "ansible.builtin.copy",
        "resolved_action": "ansible.builtin.copy",
        "task_args": "",
        "task_path": "/tmp/rec/play.yml:11",
        "host": "web1",
        "remote_addr": "127.0.2.1",
        "res": {
            "changed": True,
            "dest": "/tmp/rec/out.txt",
            "mode": "0644",
            "invocation": {"module_args": {"content": "x", "dest": "/tmp/rec/out.txt"}},
            "_ansible_no_log": False,
        },
        "start": "2026-11-27T03:49:25.796954+00:00",
        "end": "2026-11-27T03:49:26.539570+00:00",
        "duration": 0.742616,
        "event_loop": None,
        "uuid": "4289c51a-1902-469a-86b1-5347c5df21ff",
    },
}
PLAYBOOK_ON_STATS = {
    "uuid": "da8fbbc4-d3bb-450a-a3da-02b1a7298ceb",
    "counter": 25,
    "stdout": "\r\nPLAY RECAP ****\r\nweb1 : ok=6 changed=3 unreachable=0 failed=0",
    "event": "playbook_on_stats",
    "created": "2026-11-27T03:49:29.808423+00:00",
    "event_data": {
        "changed": {"web1": 3},
        "dark": {"web3": 1},
        "failures": {"web2": 1},
        "ignored": {"web1": 1},
        "ok": {"web1": 6, "web2": 2},
        "processed": {"web1": 1, "web2": 1, "web3": 1},
        "rescued": {},
        "skipped": {"web2": 1},
        "artifact_data": {},
    },
}


def ok_event(counter: int, **changes) -> dict:
    event = copy.deepcopy(RUNNER_ON_OK)
    event["counter"] = counter
    event["uuid"] = f"uuid-{counter}"
    event.update(changes)
    return event


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "fraisier.db") as opened:
        yield opened


@pytest.fixture
def deployment_id(store):
    return store.create_deployment(fraise="api", environment="production", trigger="cli")


def test_ten_thousand_events_are_all_stored_in_batches(store, deployment_id):
    writer = store.event_writer(deployment_id, batch_size=500, flush_interval=0.05)
    for counter in range(1, 10_001):
        writer.put(ok_event(counter))
    writer.close(timeout=30)
    assert writer.count == 10_000
    assert writer.batches >= 20
    events = store.events(deployment_id)
    assert [e["seq"] for e in events] == list(range(1, 10_001))
    assert store.events(deployment_id, after_seq=9_990, limit=5)[0]["seq"] == 9_991
    assert len(store.events(deployment_id, after_seq=9_990, limit=5)) == 5


def test_event_row_maps_runner_fields(store, deployment_id):
    with store.event_writer(deployment_id) as writer:
        writer.put(ok_event(1))
    (event,) = store.events(deployment_id)
    assert event["uuid"] == "uuid-1"
    assert event["event"] == "runner_on_ok"
    assert (event["host"], event["play"], event["task"]) == ("web1", "web", "Copy a file")
    assert event["action"] == "ansible.builtin.copy"
    assert event["changed"] is True and event["failed"] is False
    assert event["duration"] == pytest.approx(0.742616)
    assert event["created_at"] == "2026-11-27T03:49:26Z"
    assert event["result"]["dest"] == "/tmp/rec/out.txt"
    assert event["stdout"] == RUNNER_ON_OK["stdout"]


def test_failed_and_unreachable_events_are_flagged(store, deployment_id):
    failed = ok_event(1, event="runner_on_failed")
    failed["event_data"]["res"] = {"failed": True, "msg": "non-zero return code", "rc": 1}
    unreachable = ok_event(2, event="runner_on_unreachable")
    unreachable["event_data"]["res"] = {"unreachable": True, "msg": "ssh: connect failed"}
    with store.event_writer(deployment_id) as writer:
        writer.put(failed)
        writer.put(unreachable)
    assert [e["failed"] for e in store.events(deployment_id)] == [True, True]


def test_replayed_events_are_not_stored_twice(store, deployment_id):
    with store.event_writer(deployment_id) as writer:
        for counter in (1, 2, 3):
            writer.put(ok_event(counter))
    with store.event_writer(deployment_id) as again:
        for counter in (2, 3, 4):
            again.put(ok_event(counter))
    assert again.count == 1
    assert [e["seq"] for e in store.events(deployment_id)] == [1, 2, 3, 4]


def test_stdout_and_result_are_bounded(store, deployment_id):
    event = ok_event(1, stdout="é" * 50_000)
    event["event_data"]["res"] = {"stdout": "x" * 100_000, "changed": True}
    with store.event_writer(deployment_id) as writer:
        writer.put(event)
    row = store.db.execute_sql("SELECT stdout, result FROM tb_deployment_events").fetchone()
    assert len(row[0].encode()) <= MAX_STDOUT_BYTES
    assert "cut: 100000 bytes in all" in row[0]
    assert len(row[1].encode()) <= MAX_RESULT_BYTES
    result = json.loads(row[1])
    assert result["truncated"] is True and result["head"].startswith('{"stdout":"xxx')


def test_bound_text_keeps_short_text_and_cuts_on_characters():
    assert bound_text("short", 10) == "short"
    assert bound_text(None, 10) is None
    cut = bound_text("€" * 100, 80)
    assert len(cut.encode()) <= 80
    cut.encode("utf-8")


def test_no_log_results_are_censored(store, deployment_id):
    hidden = ok_event(1)
    hidden["event_data"]["res"] = {
        "changed": True,
        "_ansible_no_log": True,
        "stdout": "password=hunter2",
        "invocation": {"module_args": {"password": "hunter2"}},
    }
    censored = ok_event(2)
    censored["event_data"]["res"] = {
        "censored": "the output has been hidden due to the fact that 'no_log: true' was "
        "specified for this result"
    }
    loop = ok_event(3)
    loop["event_data"]["res"] = {
        "changed": False,
        "msg": "All items completed",
        "results": [
            {"item": "a", "msg": "fine", "_ansible_no_log": False},
            {"item": "hunter2", "_ansible_no_log": True, "invocation": {"x": "hunter2"}},
        ],
    }
    with store.event_writer(deployment_id) as writer:
        for event in (hidden, censored, loop):
            writer.put(event)
    events = store.events(deployment_id)
    assert set(events[0]["result"]) == {"censored"}
    assert set(events[1]["result"]) == {"censored"}
    assert events[2]["result"]["results"][0]["msg"] == "fine"
    assert set(events[2]["result"]["results"][1]) == {"censored"}
    stored = store.db.execute_sql("SELECT result FROM tb_deployment_events").fetchall()
    assert not any("hunter2" in row[0] for row in stored)


def test_redact_applies_to_stdout_and_result(store, deployment_id):
    event = ok_event(1, stdout="connecting with token s3cr3t-value")
    event["event_data"]["res"] = {"msg": "used s3cr3t-value", "changed": False}

    def redact(text: str) -> str:
        return text.replace("s3cr3t-value", "***")

    with store.event_writer(deployment_id, redact=redact) as writer:
        writer.put(event)
    (row,) = store.events(deployment_id)
    assert row["stdout"] == "connecting with token ***"
    assert row["result"]["msg"] == "used ***"


def test_stats_event_records_host_results(store, deployment_id):
    with store.event_writer(deployment_id) as writer:
        writer.put(ok_event(1))
        writer.put(PLAYBOOK_ON_STATS)
    hosts = {h["host"]: h for h in store.deployment(deployment_id)["hosts"]}
    assert hosts["web1"]["status"] == "changed" and hosts["web1"]["ignored"] == 1
    assert hosts["web2"]["status"] == "failed" and hosts["web2"]["skipped"] == 1
    assert hosts["web3"]["status"] == "unreachable" and hosts["web3"]["unreachable"] == 1


def test_host_stats_from_runner_pivots():
    stats = host_stats_from_runner(PLAYBOOK_ON_STATS["event_data"])
    assert stats["web2"] == {
        "ok": 2,
        "changed": 0,
        "failures": 1,
        "unreachable": 0,
        "skipped": 1,
        "rescued": 0,
        "ignored": 0,
    }


def test_events_without_counter_or_created_still_stored(store, deployment_id):
    with store.event_writer(deployment_id) as writer:
        writer.put({"event": "verbose", "stdout": "a"})
        writer.put({"event": "verbose", "stdout": "b"})
    events = store.events(deployment_id, after_seq=-10)
    assert [e["stdout"] for e in events] == ["b", "a"]
    assert all(e["created_at"].endswith("Z") for e in events)


def test_writer_reports_lost_events_on_close(store):
    writer = store.event_writer(424242)  # no such deployment: the foreign key refuses rows
    writer.put(ok_event(1))
    with pytest.raises(StoreError, match="1 events of deployment 424242 could not be stored"):
        writer.close(timeout=10)


def test_event_row_handles_odd_values():
    row = event_row(
        1,
        {"event": "runner_on_ok", "counter": "x", "created": "garbage", "event_data": {}},
        fallback_seq=-1,
    )
    assert row["seq"] == -1 and row["result"] is None and row["created_at"] is not None


def test_backlog_makes_put_prepare_rows_with_the_same_result(store, deployment_id):
    hidden = ok_event(2)
    hidden["event_data"]["res"] = {"_ansible_no_log": True, "stdout": "hunter2"}
    writer = store.event_writer(deployment_id, backlog=0, flush_interval=0.5)
    for counter in range(3, 1003):
        writer.put(ok_event(counter))
    writer.put(hidden)
    writer.put(PLAYBOOK_ON_STATS | {"counter": 2000})
    writer.close(timeout=30)
    assert writer.count == 1002
    events = store.events(deployment_id)
    assert len(events) == 1002
    assert events[0]["result"] == {"censored": events[0]["result"]["censored"]}
    assert {h["host"] for h in store.hosts(deployment_id)} == {"web1", "web2", "web3"}
