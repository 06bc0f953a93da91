"""`fraisier deploy` of the example api fraise on real systemd hosts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fraisier.config import load_config
from fraisier.deploys import Deployment
from fraisier.errors import LockedError
from fraisier.runner import processes_mentioning
from fraisier.store import Store
from tests.integration.support import ExampleRepo, fraisier

pytestmark = pytest.mark.hosts

APP = "/srv/hello"


@pytest.fixture
def repo(tmp_path) -> ExampleRepo:
    return ExampleRepo(tmp_path / "hello", "hello", {"VERSION": "1\n"})


def write_config(
    tmp_path: Path, repo: ExampleRepo, hosts, *, ansible: dict | None = None, **env_overrides
) -> Path:
    env = {
        "branch": "main",
        "app_path": APP,
        "systemd_service": "hello.service",
        "keep_releases": 3,
        "hosts": {h.name: h.inventory_vars for h in hosts},
        "service": {
            "exec_start": f"/usr/bin/python3 {APP}/current/app.py",
            "working_directory": f"{APP}/current",
            "environment": {"HELLO_BIND": "{{ ansible_host }}", "HELLO_PORT": "8000"},
        },
        "health_check": {
            "url": "http://{{ ansible_host }}:8000/health",
            "retries": 5,
            "delay": 1,
            "timeout": 3,
        },
    }
    env.update(env_overrides)
    data = {
        "ansible": ansible or {},
        "git": {"github": {"webhook_secret": "${FRAISIER_WEBHOOK_SECRET}"}},
        "fraises": {"hello": {"type": "api", "repository": str(repo.path),
                              "environments": {"test": env}}},
    }  # fmt: skip
    path = tmp_path / "fraises.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def served(host) -> str:
    out = host.ssh(f"curl -fsS --max-time 5 http://{host.address}:8000/")
    return out.stdout.strip()


def current_release(host) -> str:
    return host.ssh(f"readlink {APP}/current").stdout.strip()


def releases(host) -> list[str]:
    out = host.ssh(f"ls -1 {APP}/releases 2>/dev/null").stdout.split()
    return sorted(out)


def last(store_path: Path, fraise="hello", env="test") -> dict:
    with Store.open(store_path, readonly=True) as store:
        rows = store.history(fraise=fraise, environment=env, limit=1)
    return rows[0] if rows else {"status": None}


def test_first_and_second_deploy_then_health_failure_rolls_back(tmp_path, state, repo, hosts):
    (host,) = hosts(1)
    secret = "wh-secret-1b2c3d4e5f"
    vault = tmp_path / "vault.txt"
    vault.write_text("vault-pass-9a8b7c6d\n")
    os.environ["FRAISIER_WEBHOOK_SECRET"] = secret
    try:
        config = write_config(tmp_path, repo, [host], ansible={"vault_password_file": str(vault)})
        first = fraisier(config, "deploy", "hello", "test", "--json")
        assert first.returncode == 0, first.stdout + first.stderr
        result = json.loads(first.stdout)
        assert result["status"] == "successful"
        assert served(host).startswith("hello 1 ")
        release_one = current_release(host)
        assert release_one.endswith(result["release_id"])

        # Same commit again: already live, nothing to do.
        again = fraisier(config, "deploy", "hello", "test")
        assert again.returncode == 0 and "already live" in again.stdout

        repo.commit("version 2", {"VERSION": "2\n"})
        second = fraisier(config, "deploy", "hello", "test")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "successful" in second.stdout
        assert served(host).startswith("hello 2 ")
        assert len(releases(host)) == 2

        repo.commit("version 3, broken", {"VERSION": "3\n", "UNHEALTHY": "x\n"})
        third = fraisier(config, "deploy", "hello", "test")
        assert third.returncode == 1
        row = last(state / "state" / "fraisier.db")
        assert row["status"] == "rolled_back", row
        assert host.name in row["error"] and "500" in row["error"]
        assert served(host).startswith("hello 2 ")

        # Events and per-host results were recorded.
        with Store.open(state / "state" / "fraisier.db", readonly=True) as store:
            detail = store.deployment(result["deployment_id"])
            events = store.events(result["deployment_id"])
        assert detail["hosts"][0]["host"] == host.name
        assert detail["hosts"][0]["failures"] == 0
        assert any(e["event"] == "playbook_on_stats" for e in events)
        status = json.loads(fraisier(config, "status", "--json").stdout)
        assert status[0]["status"] == "rolled_back"

        # An operator rollback goes back to the release before the live one: version 1.
        back = fraisier(config, "rollback", "hello", "test", "--json")
        assert back.returncode == 0, back.stdout + back.stderr
        assert json.loads(back.stdout)["release_id"] == result["release_id"]
        assert served(host).startswith("hello 1 ")
        assert current_release(host).endswith(result["release_id"])
        row = last(state / "state" / "fraisier.db")
        assert (row["trigger"], row["status"], row["commit"]) == (
            "rollback",
            "successful",
            result["commit"],
        )
        logs = fraisier(config, "logs", str(row["id"]))
        assert logs.returncode == 0 and "successful" in logs.stdout

        # No secret anywhere Fraisier writes.
        for needle in (secret, "vault-pass-9a8b7c6d"):
            found = subprocess.run(
                ["grep", "-rl", needle, str(state / "work"), str(state / "state")],
                capture_output=True,
                text=True,
            )
            assert found.stdout == "", found.stdout
            for out in (first, second, third):
                assert needle not in out.stdout + out.stderr
    finally:
        os.environ.pop("FRAISIER_WEBHOOK_SECRET", None)


def test_dry_run_changes_nothing(tmp_path, state, repo, hosts):
    (host,) = hosts(1)
    config = write_config(tmp_path, repo, [host])
    assert fraisier(config, "deploy", "hello", "test").returncode == 0
    repo.commit("version 2", {"VERSION": "2\n"})
    snapshot = (
        "find /srv /etc/systemd/system -printf '%p %y %s %T@ %l\\n' | sort;"
        " systemctl show -p ActiveEnterTimestamp hello.service"
    )
    before = host.ssh(snapshot).stdout
    dry = fraisier(config, "deploy", "hello", "test", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert json.loads(dry.stdout)["dry_run"] is True
    assert host.ssh(snapshot).stdout == before
    assert served(host).startswith("hello 1 ")
    row = last(state / "state" / "fraisier.db")
    assert row["dry_run"] is True and row["status"] == "successful"


def test_one_host_failing_its_build_stops_every_switch(tmp_path, state, repo, hosts):
    one, two = hosts(2)
    config = write_config(
        tmp_path, repo, [one, two], build={"command": "test ! -e /etc/fail-build"}
    )
    assert fraisier(config, "deploy", "hello", "test").returncode == 0
    before = {h.name: current_release(h) for h in (one, two)}
    two.ssh("touch /etc/fail-build", check=True)
    repo.commit("version 2", {"VERSION": "2\n"})
    out = fraisier(config, "deploy", "hello", "test")
    assert out.returncode == 1
    assert {h.name: current_release(h) for h in (one, two)} == before
    assert served(one).startswith("hello 1 ") and served(two).startswith("hello 1 ")
    row = last(state / "state" / "fraisier.db")
    assert row["status"] == "failed" and two.name in row["error"]


def test_hostile_commit_message_is_inert(tmp_path, state, repo, hosts):
    (host,) = hosts(1)
    marker = tmp_path / "pwned"
    repo.commit('{{ lookup("pipe", "touch ' + str(marker) + '") }}', {"VERSION": "7\n"})
    config = write_config(tmp_path, repo, [host])
    out = fraisier(config, "deploy", "hello", "test")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not marker.exists()
    assert host.ssh(f"test -e {marker}").returncode != 0


def test_repeated_failures_keep_the_good_release(tmp_path, state, repo, hosts):
    (host,) = hosts(1)
    config = write_config(
        tmp_path, repo, [host], keep_releases=2, build={"command": "test ! -e BROKEN"}
    )
    assert fraisier(config, "deploy", "hello", "test").returncode == 0
    good = current_release(host)
    for n in range(3):
        repo.commit(f"broken {n}", {"BROKEN": f"{n}\n"})
        assert fraisier(config, "deploy", "hello", "test").returncode == 1
    assert current_release(host) == good
    assert Path(good).name in releases(host)
    assert served(host).startswith("hello 1 ")


def test_concurrent_deploys_of_one_pair_one_is_refused_and_cancel_kills_all(
    tmp_path, state, repo, hosts
):
    (host,) = hosts(1)
    config_path = write_config(tmp_path, repo, [host], build={"command": "sleep 120"})
    config = load_config(config_path)
    with Store.open() as store:
        first = Deployment(config, "hello", "test", store=store)
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.setdefault("r", first.run()))
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                rows = store.history(fraise="hello", environment="test", limit=1)
                if (
                    rows
                    and rows[0]["status"] == "running"
                    and host.ssh("pgrep -f 'sleep 120'").stdout.strip()
                ):
                    break
                time.sleep(0.3)
            else:
                pytest.fail("the first deployment never reached its build step")

            second = fraisier(config_path, "deploy", "hello", "test", "--force")
            assert second.returncode == 1
            assert "is being deployed by" in second.stderr

            with pytest.raises(LockedError):
                Deployment(config, "hello", "test", store=store, force=True).run()
        finally:
            first.cancel()
            thread.join(timeout=120)
    assert outcome["r"].status == "canceled"
    run_dirs = list((state / "work" / "runs").iterdir())
    for run_dir in run_dirs:
        assert processes_mentioning(str(run_dir)) == set()
    # Canceled during the build: the release never went live.
    assert current_release(host) == ""


def test_cancel_command_stops_a_running_cli_deploy(tmp_path, state, repo, hosts):
    (host,) = hosts(1)
    config = write_config(tmp_path, repo, [host], build={"command": "sleep 120"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fraisier", "-c", str(config), "deploy", "hello", "test"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        deployment_id = None
        while time.monotonic() < deadline:
            db = state / "state" / "fraisier.db"
            if db.exists():
                row = last(db)
                if row["status"] == "running" and host.ssh("pgrep -f 'sleep 120'").stdout:
                    deployment_id = row["id"]
                    break
            time.sleep(0.3)
        assert deployment_id, "the deployment never reached its build step"
        out = fraisier(config, "cancel", str(deployment_id))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "canceled" in out.stdout
        proc.wait(timeout=60)
        assert proc.returncode == 1
        assert last(state / "state" / "fraisier.db")["status"] == "canceled"
        for run_dir in (state / "work" / "runs").iterdir():
            assert processes_mentioning(str(run_dir)) == set()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
