"""fraisier.runner against a real ansible-playbook on the local connection."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fraisier.inventory import unsafe
from fraisier.runner import PlaybookRun, PlaybookRunner, processes_mentioning

PLAYBOOK = """
- name: Exercise the runner
  hosts: fraisier_targets
  gather_facts: false
  tasks:
    - name: Show the commit message
      ansible.builtin.debug:
        msg: "{{ fraisier_commit_message }}"
    - name: Write the commit message to a file
      ansible.builtin.copy:
        content: "{{ fraisier_commit_message }}"
        dest: "{{ out_dir }}/message.txt"
        mode: "0644"
    - name: Sleep so that the run can be canceled
      ansible.builtin.shell: "sleep 60 & sleep 60"
      when: do_sleep | default(false)
      changed_when: false
    - name: Record the result for the controller
      ansible.builtin.set_stats:
        data: "{{ {'fraisier_live': {inventory_hostname: 'r1'}} }}"
"""


def _inventory():
    return {
        "all": {
            "children": {
                "fraisier_targets": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                        }
                    }
                }
            }
        }
    }


@pytest.fixture
def playbook(tmp_path: Path) -> Path:
    path = tmp_path / "pb.yml"
    path.write_text(PLAYBOOK)
    return path


def _run(tmp_path, playbook, extravars, **kwargs):
    events = []
    run = PlaybookRun(
        name="t",
        playbook=playbook,
        inventory=_inventory(),
        extravars={"out_dir": str(tmp_path), **extravars},
        **kwargs,
    )
    runner = PlaybookRunner(run, work_dir=tmp_path / "work", on_event=events.append)
    return runner, events


def test_hostile_commit_message_stays_a_string(tmp_path, playbook):
    marker = tmp_path / "pwned"
    message = '{{ lookup("pipe", "touch ' + str(marker) + '") }}'
    runner, events = _run(tmp_path, playbook, {"fraisier_commit_message": unsafe(message)})
    outcome = runner.run()
    assert outcome.status == "successful", events[-1]
    assert not marker.exists()
    assert (tmp_path / "message.txt").read_text() == message
    assert outcome.artifact_data == {"fraisier_live": {"localhost": "r1"}}
    assert outcome.host_stats["localhost"]["failures"] == 0
    assert outcome.playbook_pid and outcome.event_count == len(events)


def test_plain_extra_var_would_have_been_templated(tmp_path, playbook):
    """The reason for unsafe(): the same message as a plain extra var runs on the controller."""
    marker = tmp_path / "pwned"
    message = '{{ lookup("pipe", "touch ' + str(marker) + '") }}'
    runner, _ = _run(tmp_path, playbook, {"fraisier_commit_message": message})
    runner.run()
    assert marker.exists()


def test_secrets_stay_out_of_env_and_artifacts(tmp_path, playbook, monkeypatch):
    secret = "wh-secret-7f3a9c1e"
    monkeypatch.setenv("FRAISIER_WEBHOOK_SECRET", secret)
    monkeypatch.setenv("SOME_TOKEN_FOR_TEST", f"prefix-{secret}")
    runner, events = _run(
        tmp_path, playbook, {"fraisier_commit_message": unsafe("hello")}, secrets=(secret,)
    )
    outcome = runner.run()
    assert outcome.status == "successful"
    found = subprocess.run(
        ["grep", "-rl", secret, str(outcome.private_data_dir)], capture_output=True, text=True
    )
    assert found.stdout == ""
    assert secret not in repr(events)


def test_cancel_stops_every_process_of_the_run(tmp_path, playbook):
    runner, events = _run(
        tmp_path,
        playbook,
        {"fraisier_commit_message": unsafe("x"), "do_sleep": True},
        timeout=None,
    )
    started = threading.Event()

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(e.get("event_data", {}).get("task", "").startswith("Sleep") for e in events):
                started.set()
                break
            time.sleep(0.05)
        time.sleep(1.0)
        runner.cancel()

    threading.Thread(target=watch, daemon=True).start()
    outcome = runner.run()
    assert started.is_set()
    assert outcome.status == "canceled"
    pid = outcome.playbook_pid
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert processes_mentioning(str(outcome.private_data_dir)) == set()
    sleepers = subprocess.run(["pgrep", "-f", "sleep 60"], capture_output=True, text=True)
    mine = [p for p in sleepers.stdout.split() if _is_descendant_of_run(int(p), tmp_path)]
    assert mine == []


def test_timeout_is_reported_as_timeout(tmp_path, playbook):
    runner, _ = _run(
        tmp_path,
        playbook,
        {"fraisier_commit_message": unsafe("x"), "do_sleep": True},
        timeout=3,
    )
    started = time.monotonic()
    outcome = runner.run()
    assert outcome.status == "timeout"
    assert time.monotonic() - started < 30


def test_fresh_private_data_dir_per_run(tmp_path, playbook):
    first, _ = _run(tmp_path, playbook, {"fraisier_commit_message": unsafe("a"), "stale": 1})
    one = first.run()
    second, _ = _run(tmp_path, playbook, {"fraisier_commit_message": unsafe("b")})
    two = second.run()
    assert one.private_data_dir != two.private_data_dir
    assert "stale" not in (two.private_data_dir / "env" / "extravars").read_text()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def _is_descendant_of_run(pid: int, tmp_path: Path) -> bool:
    """A `sleep 60` left by this test's run has our tmp_path in an ancestor's environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return str(tmp_path).encode() in environ or os.getpid() == pid
