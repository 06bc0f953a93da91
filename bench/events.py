"""Benchmark the event writer: replay runner events through EventWriter.put into SQLite.

The events have the shapes ansible-runner 2.4 produced for a localhost playbook (task start,
runner start, ok with a module result, loop items, a failure, a no_log result), varied per
host, task and counter. With --record, a real playbook is run once with ansible_runner on
localhost and its events are the templates instead.

Prints events/s sustained (first put to last row committed), put() latency p50/p99 and the
peak RSS, each with PASS/FAIL against its target; exits 0 whatever the figures.

    .venv/bin/python bench/events.py [--events 100000] [--record]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fraisier.store import Store

TARGET_RATE = 20_000
TARGET_P99_MS = 1.0
TARGET_RSS_MB = 200

_DATA = {
    "playbook": "/srv/fraisier/playbooks/api.yml",
    "playbook_uuid": "f1fdc32f-5bdf-41d1-994b-c3fd806c392b",
    "play": "Deploy api",
    "play_uuid": "02fc0000-0001-50c1-fe48-000000000002",
    "play_pattern": "all",
    "task": "Unpack the release",
    "task_uuid": "02fc0000-0001-50c1-fe48-000000000004",
    "task_action": "ansible.builtin.unarchive",
    "resolved_action": "ansible.builtin.unarchive",
    "task_args": "",
    "task_path": "/srv/fraisier/roles/fraise_release/tasks/main.yml:14",
    "host": "web1",
    "remote_addr": "127.0.2.1",
}
TEMPLATES = [
    {
        "event": "playbook_on_task_start",
        "stdout": "\r\nTASK [fraise_release : Unpack the release] ****************************",
        "event_data": {**_DATA, "is_conditional": False, "name": "Unpack the release"},
    },
    {"event": "runner_on_start", "stdout": "", "event_data": {**_DATA}},
    {
        "event": "runner_on_ok",
        "stdout": "\x1b[0;33mchanged: [web1]\x1b[0m",
        "event_data": {
            **_DATA,
            "res": {
                "changed": True,
                "dest": "/srv/api/releases/20261127034501",
                "src": "/root/.ansible/tmp/ansible-tmp-1764215101/source",
                "handler": "TgzArchive",
                "gid": 0,
                "uid": 0,
                "mode": "0755",
                "owner": "root",
                "group": "root",
                "size": 4096,
                "state": "directory",
                "extract_results": {"cmd": ["/usr/bin/tar", "--extract", "-C", "/srv/api"]},
                "invocation": {
                    "module_args": {"src": "/tmp/api.tgz", "dest": "/srv/api/releases/x"}
                },
                "_ansible_no_log": False,
            },
            "start": "2026-11-27T03:49:25.796954+00:00",
            "end": "2026-11-27T03:49:26.539570+00:00",
            "duration": 0.742616,
            "event_loop": None,
        },
    },
    {
        "event": "runner_item_on_ok",
        "stdout": "\x1b[0;32mok: [web1] => (item=/srv/api/shared/log)\x1b[0m",
        "event_data": {
            **_DATA,
            "res": {
                "changed": False,
                "path": "/srv/api/shared/log",
                "state": "directory",
                "item": "/srv/api/shared/log",
                "ansible_loop_var": "item",
                "_ansible_item_label": "/srv/api/shared/log",
                "_ansible_no_log": False,
            },
        },
    },
    {
        "event": "runner_on_ok",
        "stdout": "\x1b[0;33mchanged: [web1]\x1b[0m",
        "event_data": {
            **_DATA,
            "res": {
                "censored": "the output has been hidden due to the fact that 'no_log: true' "
                "was specified for this result"
            },
            "duration": 0.31,
        },
    },
    {
        "event": "runner_on_failed",
        "stdout": '\x1b[0;31mfatal: [web1]: FAILED! => {"changed": true, "cmd": '
        '["curl", "-fsS", "http://127.0.2.1:8000/health"], "rc": 7}\x1b[0m\r\n'
        "\x1b[0;36m...ignoring\x1b[0m",
        "event_data": {
            **_DATA,
            "ignore_errors": True,
            "res": {
                "changed": True,
                "cmd": ["curl", "-fsS", "http://127.0.2.1:8000/health"],
                "rc": 7,
                "stdout": "",
                "stderr": "curl: (7) Failed to connect to 127.0.2.1 port 8000",
                "msg": "non-zero return code",
                "start": "2026-11-27 03:49:29.631614",
                "end": "2026-11-27 03:49:29.646415",
                "delta": "0:00:00.014801",
                "stdout_lines": [],
                "stderr_lines": ["curl: (7) Failed to connect to 127.0.2.1 port 8000"],
                "_ansible_no_log": False,
            },
            "duration": 0.21,
        },
    },
]
for template in TEMPLATES:
    template.update(
        {
            "runner_ident": "54193050-9e49-41cf-98c4-a78068ca89df",
            "pid": 31012,
            "parent_uuid": "02fc0000-0001-50c1-fe48-000000000004",
            "created": "2026-11-27T03:49:26.540351+00:00",
            "start_line": 15,
            "end_line": 16,
        }
    )

PLAYBOOK = """\
- name: Exercise common modules
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Print items
      ansible.builtin.debug:
        msg: "hello {{ item }}"
      loop: [1, 2, 3]
    - name: Run a command
      ansible.builtin.command: echo hi
      changed_when: false
    - name: Use a secret
      ansible.builtin.command: echo s3cr3t
      no_log: true
    - name: Write a file
      ansible.builtin.copy:
        content: "x"
        dest: "{{ playbook_dir }}/out.txt"
        mode: "0644"
    - name: Fail and go on
      ansible.builtin.command: "false"
      ignore_errors: true
"""


def record_templates() -> list[dict]:
    """Run a small localhost playbook with ansible_runner once; return its events."""
    import ansible_runner

    events: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="fraisier-record-"))
    try:
        playbook = workdir / "play.yml"
        playbook.write_text(PLAYBOOK)
        (workdir / "run").mkdir()
        # ansible-runner looks ansible-playbook up on PATH: the virtualenv's bin first.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        ansible_runner.run(
            private_data_dir=str(workdir / "run"),
            playbook=str(playbook),
            inventory=(
                f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}"
            ),
            event_handler=lambda event: events.append(event) or False,
            quiet=True,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    usable = [e for e in events if e.get("event", "").startswith(("runner_", "playbook_on_task"))]
    if not usable:
        sys.exit("recording produced no runner events; run without --record")
    return usable


def replay(templates: list[dict], count: int, *, parse_json: bool = False):
    """Yield `count` fresh event dicts varied by counter, uuid, host and task.

    By default each event is a new dict sharing its template's nested task result, as a
    producer that already holds parsed events would hand them over. With parse_json, each
    event is parsed from JSON text, as ansible-runner itself does, and that cost lands in
    the same process and counts against the rate.
    """
    texts = [json.dumps(t) for t in templates]
    hosts = [f"web{n}" for n in range(1, 11)]
    run = uuid.uuid4().hex[:20]
    for counter in range(1, count + 1):
        index = counter % len(templates)
        if parse_json:
            event = json.loads(texts[index])
            data = event["event_data"]
        else:
            template = templates[index]
            event = dict(template)
            data = event["event_data"] = dict(template["event_data"])
        event["counter"] = counter
        event["uuid"] = f"{run[:8]}-{run[8:12]}-{run[12:16]}-{run[16:20]}-{counter:012x}"
        data["host"] = hosts[counter % len(hosts)]
        data["task"] = f"{data.get('task', 'Task')} #{counter // 60}"
        yield event


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--record", action="store_true", help="record templates with a real run")
    parser.add_argument(
        "--parse-json",
        action="store_true",
        help="parse every event from JSON text in the producer, as ansible-runner does",
    )
    args = parser.parse_args()

    templates = record_templates() if args.record else copy.deepcopy(TEMPLATES)
    print(
        f"{len(templates)} event templates "
        f"({'recorded from a real ansible_runner run' if args.record else 'built in'}), "
        f"{args.events:,} events to replay, "
        f"{'parsed from JSON' if args.parse_json else 'fresh dicts'} per event"
    )
    with tempfile.TemporaryDirectory(prefix="fraisier-bench-") as tmp:
        path = Path(tmp) / "fraisier.db"
        with Store.open(path) as store:
            deployment_id = store.create_deployment(
                fraise="api", environment="production", trigger="cli", status="running"
            )
            latencies = []
            clock = time.perf_counter_ns
            events = replay(templates, args.events, parse_json=args.parse_json)
            writer = store.event_writer(deployment_id, batch_size=args.batch_size)
            put = writer.put
            cpu_started = time.process_time()
            started = time.perf_counter()
            for event in events:
                before = clock()
                put(event)
                latencies.append(clock() - before)
            enqueued = time.perf_counter()
            writer.close(timeout=600)
            finished = time.perf_counter()
            cpu = time.process_time() - cpu_started
            stored = store.db.execute_sql(
                "SELECT COUNT(*) FROM tb_deployment_events WHERE deployment_id = ?",
                (deployment_id,),
            ).fetchone()[0]
        size_mb = path.stat().st_size / 1e6 + (
            Path(f"{path}-wal").stat().st_size / 1e6 if Path(f"{path}-wal").exists() else 0
        )

    latencies.sort()
    p50 = latencies[len(latencies) // 2] / 1e6
    p99 = latencies[int(len(latencies) * 0.99)] / 1e6
    worst = latencies[-1] / 1e6
    rate = stored / (finished - started)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"stored {stored:,} rows in {writer.batches} batches, database {size_mb:.1f} MB")
    print(f"all put() calls done after   {enqueued - started:8.2f} s")
    print(f"last row committed after     {finished - started:8.2f} s")
    print(
        f"sustained rate               {rate:10,.0f} events/s   "
        f"target >= {TARGET_RATE:,}   {verdict(rate >= TARGET_RATE)}"
    )
    print(
        f"CPU time (all threads)       {cpu:8.2f} s      "
        f"({stored / cpu:,.0f} events per CPU second; the machine had "
        f"{os.getloadavg()[0]:.1f} load on {os.cpu_count()} CPUs)"
    )
    print(f"put() latency p50            {p50 * 1000:8.1f} us")
    print(
        f"put() latency p99            {p99 * 1000:8.1f} us     "
        f"target <= {TARGET_P99_MS * 1000:.0f} us   {verdict(p99 <= TARGET_P99_MS)}"
    )
    print(f"put() latency max            {worst:8.2f} ms")
    print(
        f"peak RSS                     {rss_mb:8.1f} MB     "
        f"target <= {TARGET_RSS_MB} MB   {verdict(rss_mb <= TARGET_RSS_MB)}"
    )
    if stored != args.events:
        print(f"WARNING: {args.events - stored} events missing from the store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
