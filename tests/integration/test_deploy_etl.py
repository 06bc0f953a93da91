"""`fraisier deploy` of an etl fraise (examples/jobs, bin/etl) on real systemd hosts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.support import ExampleRepo, fraisier

pytestmark = pytest.mark.hosts

OUTPUT = "/var/lib/jobs/etl.out"


@pytest.fixture(scope="module")
def two_hosts(module_hosts):
    return module_hosts(2)


def write_config(tmp_path: Path, repo: ExampleRepo, hosts, **env_overrides) -> Path:
    env = {
        "branch": "main",
        "app_path": "/srv/etl",
        "hosts": {h.name: h.inventory_vars for h in hosts},
        "script_path": "bin/etl",
        "database": {"name": "warehouse"},
        "vars": {"env": {"GREETING": "bonjour", "ETL_OUTPUT": OUTPUT}},
    }
    env.update(env_overrides)
    data = {
        "fraises": {"etl": {"type": "etl", "repository": str(repo.path),
                            "environments": {"test": env}}},
    }  # fmt: skip
    path = tmp_path / "fraises.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def deploy(config: Path, *args: str) -> dict:
    out = fraisier(config, "deploy", "etl", "test", "--json", *args)
    assert out.stdout, out.stderr
    return {"rc": out.returncode, **json.loads(out.stdout)}


def output(host) -> str:
    return host.ssh(f"cat {OUTPUT} 2>/dev/null || echo none").stdout.strip()


def current(host, app="/srv/etl") -> str:
    return host.ssh(f"readlink {app}/current").stdout.strip()


def test_script_runs_once_on_the_first_host_then_everywhere(tmp_path, state, two_hosts):
    one, two = two_hosts
    for host in two_hosts:
        host.ssh(f"rm -rf {OUTPUT} /srv/etl")
    repo = ExampleRepo(tmp_path / "etl", "jobs")
    config = write_config(tmp_path, repo, two_hosts)

    first = deploy(config)
    assert first["rc"] == 0 and first["status"] == "successful", first
    assert output(one) == "loaded 1 rows=42"
    assert output(two) == "none"
    assert current(one).endswith(first["release_id"]) and current(two) == current(one)
    # Its output is stored with the deployment and shown by `fraisier logs`.
    logs = fraisier(config, "logs", str(first["deployment_id"])).stdout
    assert "etl: database warehouse, greeting bonjour" in logs
    assert f"etl: release {first['release_id']} of etl/test" in logs

    # A dry run of the next commit runs nothing and changes nothing.
    repo.commit("version 2", {"VERSION": "2\n"})
    snapshot = "find /srv/etl /var/lib/jobs -printf '%p %y %s %T@ %l\\n' | sort"
    before = [h.ssh(snapshot).stdout for h in two_hosts]
    dry = deploy(config, "--dry-run")
    assert dry["rc"] == 0 and dry["dry_run"] is True, dry
    assert [h.ssh(snapshot).stdout for h in two_hosts] == before

    config = write_config(tmp_path, repo, two_hosts, run_on="all")
    second = deploy(config)
    assert second["rc"] == 0, second
    assert output(one) == output(two) == "loaded 2 rows=42"


def test_failing_script_fails_with_its_last_lines_and_switches_nothing(tmp_path, state, two_hosts):
    one = two_hosts[0]
    repo = ExampleRepo(tmp_path / "etl", "jobs")
    config = write_config(tmp_path, repo, [one], app_path="/srv/etl-fail")
    assert deploy(config)["rc"] == 0
    live = current(one, "/srv/etl-fail")

    repo.commit("broken", {"ETL_FAIL": "warehouse is read-only\n"})
    failed = deploy(config)
    assert failed["rc"] == 1 and failed["status"] == "failed", failed
    error = failed["error"]
    assert error.startswith(f"{one.name}: task 'Fail when the script failed' failed: ")
    assert "bin/etl exited with 3" in error
    assert "etl: step 7 of 7 checked | etl: ERROR warehouse is read-only" in error
    # Only the last lines: the first steps are not in the error.
    assert "step 1 of 7" not in error
    assert current(one, "/srv/etl-fail") == live


def test_missing_script_fails_naming_the_path_before_running(tmp_path, state, two_hosts):
    one = two_hosts[0]
    repo = ExampleRepo(tmp_path / "etl", "jobs")
    config = write_config(
        tmp_path, repo, [one], app_path="/srv/etl-missing", script_path="bin/nope"
    )
    failed = deploy(config)
    assert failed["rc"] == 1 and failed["status"] == "failed", failed
    assert "has no bin/nope (fraise_etl_script_path, relative to the release)" in failed["error"]
    assert one.ssh("test -e /srv/etl-missing/current").returncode != 0
