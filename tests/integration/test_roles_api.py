"""playbooks/api.yml and playbooks/rollback.yml on two real systemd hosts, through ansible-runner.

Each test deploys its own app (path, unit, port), so the two module hosts are shared.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.hosts

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "hello"
_ports = itertools.count(8100)


@pytest.fixture(scope="module")
def two_hosts(module_hosts):
    """Two hosts shared by the tests of this module."""
    return module_hosts(2)


class App:
    """One app deployed by the api playbook to the module's hosts."""

    def __init__(self, tmp_path: Path, hosts, name: str):
        self.tmp = tmp_path
        self.hosts = hosts
        self.name = name
        self.path = f"/srv/{name}"
        self.port = next(_ports)
        self.releases = itertools.count(1)
        self.runs = itertools.count(1)
        inventory = {
            "all": {
                "children": {
                    "fraisier_targets": {
                        "hosts": {h.name: h.inventory_vars for h in hosts},
                    }
                }
            }
        }
        self.inventory = tmp_path / "hosts.yml"
        self.inventory.write_text(yaml.safe_dump(inventory))
        self.vars = {
            "fraisier_deployment_id": 1,
            "fraisier_fraise": name,
            "fraisier_environment": "test",
            "fraisier_commit": "0" * 40,
            "fraisier_branch": "main",
            "fraisier_commit_message": "test",
            "fraisier_serial": "100%",
            "fraisier_any_errors_fatal": True,
            "fraise_release_app_path": self.path,
            "fraise_release_keep": 2,
            "fraise_api_systemd_service": f"{name}.service",
            # The written unit: each host binds its own address (all hosts share one network).
            "fraise_api_service": {
                "exec_start": f"/usr/bin/python3 {self.path}/current/app.py",
                "environment": {"HELLO_BIND": "{{ ansible_host }}", "HELLO_PORT": self.port},
            },
            "fraise_api_health_check": {
                "url": f"http://{{{{ ansible_host }}}}:{self.port}/health",
                "retries": 4,
                "delay": 1,
            },
        }

    def archive(self, version: str, unhealthy: bool = False, failing_build_on: str = "") -> str:
        """Pack the example app as one release; return its release id and archive path."""
        release_id = f"r{next(self.releases)}-{version}"
        tree = self.tmp / release_id
        shutil.copytree(EXAMPLE, tree)
        (tree / "VERSION").write_text(f"{version}\n")
        # The shipped unit names /srv/hello: the written unit of self.vars wins over it.
        if unhealthy:
            (tree / "UNHEALTHY").write_text("")
        if failing_build_on:
            (tree / "build.sh").write_text(
                f'#!/bin/sh\n[ "$(hostname)" != {failing_build_on} ] || exit 7\n'
            )
        archive = self.tmp / f"{release_id}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tree, arcname=".")
        return release_id

    def run(self, playbook: str, release_id: str | None = None, check: bool = False, **extra):
        """Run a playbook through ansible-runner; return (rc, stats artifact, failures)."""
        import ansible_runner

        extravars = dict(self.vars, **extra)
        if release_id:
            extravars["fraise_release_id"] = release_id
            extravars["fraise_release_archive"] = str(self.tmp / f"{release_id}.tar.gz")
        # A fresh private data dir per run: runner keeps old extra vars in a reused one.
        data_dir = self.tmp / f"runner-{next(self.runs)}"
        data_dir.mkdir()
        result = ansible_runner.run(
            private_data_dir=str(data_dir),
            playbook=str(REPO_ROOT / "playbooks" / playbook),
            inventory=str(self.inventory),
            extravars=extravars,
            envvars={
                "ANSIBLE_ROLES_PATH": str(REPO_ROOT / "roles"),
                "ANSIBLE_PIPELINING": "True",
                "ANSIBLE_HOST_KEY_CHECKING": "False",
                # ansible-playbook of this virtualenv, also when pytest is run by its path.
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            },
            cmdline="--check --diff" if check else None,
            quiet=True,
        )
        stats, failures = {}, []
        for event in result.events:
            if event["event"] == "playbook_on_stats":
                stats = event["event_data"].get("artifact_data", {})
            if event["event"] == "runner_on_failed" and not event["event_data"].get(
                "ignore_errors"
            ):
                failures.append(event["event_data"]["res"].get("msg", ""))
        return result.rc, stats, failures

    def sh(self, host, command: str) -> str:
        return host.ssh(command).stdout.strip()

    def state(self, host) -> dict:
        """Current target, history and release dirs of the app on one host."""
        out = self.sh(
            host,
            f"cd {self.path} 2>/dev/null && echo current=$(readlink current);"
            f"echo history=$(cat {self.path}/.fraisier/history 2>/dev/null);"
            f"echo releases=$(ls {self.path}/releases 2>/dev/null);"
            f"echo active=$(systemctl is-active {self.name}.service)",
        )
        return dict(line.split("=", 1) for line in out.splitlines())

    def answer(self, host) -> str:
        return self.sh(
            host,
            f"python3 -c \"import urllib.request as u; print(u.urlopen('http://{host.address}:{self.port}/').read().decode())\"",
        )


@pytest.fixture
def app(request, tmp_path, two_hosts):
    """A fresh app on both hosts; its service is stopped and removed afterwards."""
    name = request.node.name.removeprefix("test_").replace("_", "")[:20]
    app = App(tmp_path, two_hosts, name)
    yield app
    for host in two_hosts:
        app.sh(
            host,
            f"systemctl disable --now {name}.service 2>/dev/null;"
            f"rm -rf /etc/systemd/system/{name}.service {app.path}; systemctl daemon-reload",
        )


def test_deploy_then_failed_health_rolls_the_batch_back(app):
    good = app.archive("1.0")
    rc, stats, _ = app.run("api.yml", good)
    assert rc == 0
    assert stats["fraisier_live"] == {h.name: good for h in app.hosts}
    for host in app.hosts:
        assert f"hello 1.0 ({good})" in app.answer(host)

    bad = app.archive("2.0", unhealthy=True)
    rc, stats, failures = app.run("api.yml", bad)
    assert rc != 0
    rollback = stats["fraisier_rollback"]
    assert {h: v["status"] for h, v in rollback.items()} == {
        h.name: "rolled_back" for h in app.hosts
    }
    assert all("/health" in v["error"] and "500" in v["error"] for v in rollback.values())
    assert any(f"{bad} failed its health check on" in f for f in failures)
    for host in app.hosts:
        state = app.state(host)
        assert state["current"] == f"releases/{good}"
        assert state["history"] == good
        assert f"hello 1.0 ({good})" in app.answer(host)


def test_first_release_failing_health_leaves_nothing_live(app):
    bad = app.archive("1.0", unhealthy=True)
    rc, stats, _ = app.run("api.yml", bad)
    assert rc != 0
    for host in app.hosts:
        outcome = stats["fraisier_rollback"][host.name]
        assert outcome["status"] == "rollback_failed"
        assert "no previous good release" in outcome["error"]
        state = app.state(host)
        assert state["current"] == ""
        assert state["history"] == ""
        assert state["active"] != "active"


def test_one_host_failing_its_build_stops_every_switch(app):
    good = app.archive("1.0")
    assert app.run("api.yml", good)[0] == 0
    broken = app.archive("2.0", failing_build_on=app.hosts[1].name)
    rc, stats, _ = app.run("api.yml", broken)
    assert rc != 0
    assert "fraisier_live" not in stats
    for host in app.hosts:
        assert app.state(host)["current"] == f"releases/{good}"


def test_missing_unit_fails_before_the_switch_naming_it(app):
    release = app.archive("1.0")
    # Neither a written unit nor one shipped under that name: the unit must exist already.
    rc, _, failures = app.run("api.yml", release, fraise_api_service={})
    assert rc != 0
    assert any(
        f"systemd unit {app.name}.service not found on host {app.hosts[0].name}" in f
        for f in failures
    )
    for host in app.hosts:
        assert app.state(host)["current"] == ""


def test_rebuild_in_production_is_refused_before_any_change(app):
    release = app.archive("1.0")
    rc, _, failures = app.run(
        "api.yml",
        release,
        fraisier_environment="production",
        fraise_api_database={"name": "hello", "strategy": "rebuild"},
    )
    assert rc != 0
    assert any("rebuild is refused in production" in f for f in failures)
    for host in app.hosts:
        assert app.sh(host, f"test -e {app.path} && echo exists || echo absent") == "absent"


def test_check_mode_changes_nothing(app):
    snapshot = (
        f"find {app.path} /etc/systemd/system/{app.name}.service"
        " -printf '%p %l %T@\\n' 2>/dev/null | sort;"
        f"systemctl show -p MainPID -p ActiveState {app.name}.service"
    )
    # On a fresh host, then on a host with a live release.
    first = app.archive("1.0")
    before = [app.sh(h, snapshot) for h in app.hosts]
    assert app.run("api.yml", first, check=True)[0] == 0
    assert [app.sh(h, snapshot) for h in app.hosts] == before
    assert app.run("api.yml", first)[0] == 0
    second = app.archive("2.0")
    before = [app.sh(h, snapshot) for h in app.hosts]
    assert app.run("api.yml", second, check=True)[0] == 0
    assert app.run("rollback.yml", check=True)[0] != 0  # nothing to roll back to, said early
    assert [app.sh(h, snapshot) for h in app.hosts] == before


def test_rolling_batches_and_operator_rollback(app):
    first, second = app.archive("1.0"), app.archive("2.0")
    rc, _, _ = app.run(
        "api.yml",
        first,
        fraisier_serial=1,
        fraise_api_database={"name": "hellodb", "strategy": "apply"},
        fraise_api_migrate_command='echo "$DATABASE_NAME $FRAISIER_DATABASE" > MIGRATED',
        fraise_api_compile_command="test -f MIGRATED && test -f BUILD_INFO && touch COMPILED",
    )
    assert rc == 0
    release = f"{app.path}/releases/{first}"
    for host in app.hosts:
        assert app.sh(host, f"cat {release}/MIGRATED; ls {release}/COMPILED") == (
            f"hellodb hellodb\n{release}/COMPILED"
        )
    rc, stats, _ = app.run("api.yml", second, fraisier_serial=1)
    assert rc == 0
    assert stats["fraisier_live"] == {h.name: second for h in app.hosts}
    rc, stats, _ = app.run("rollback.yml")
    assert rc == 0
    assert stats["fraisier_live"] == {h.name: first for h in app.hosts}
    for host in app.hosts:
        assert f"hello 1.0 ({first})" in app.answer(host)
        assert app.state(host)["history"] == first
    rc, _, failures = app.run("rollback.yml")
    assert rc != 0
    assert any("no release to roll back to" in f for f in failures)
