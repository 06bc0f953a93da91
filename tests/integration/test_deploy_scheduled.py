"""`fraisier deploy` of a scheduled fraise (examples/jobs) on a real systemd host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.support import ExampleRepo, fraisier

pytestmark = pytest.mark.hosts

APP = "/srv/jobs"
UNITS = "/etc/systemd/system"


@pytest.fixture(scope="module")
def host(module_hosts):
    (booted,) = module_hosts(1)
    return booted


def write_config(tmp_path: Path, repo: ExampleRepo, host, jobs: dict, **env_overrides) -> Path:
    env = {
        "branch": "main",
        "app_path": APP,
        "hosts": {host.name: host.inventory_vars},
        "vars": {"env": {"REPORT_OUTPUT": "/var/lib/jobs/report.log"}},
        "jobs": jobs,
    }
    env.update(env_overrides)
    data = {
        "fraises": {"jobs": {"type": "scheduled", "repository": str(repo.path),
                             "environments": {"test": env}}},
    }  # fmt: skip
    path = tmp_path / "fraises.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def deploy(config: Path, *args: str) -> dict:
    out = fraisier(config, "deploy", "jobs", "test", "--json", *args)
    assert out.stdout, out.stderr
    return {"rc": out.returncode, **json.loads(out.stdout)}


def timers_recorded(config: Path, deployment_id: int) -> dict:
    """The fraisier_timers stats of a deployment, read back through `fraisier logs --json`."""
    logs = json.loads(fraisier(config, "logs", str(deployment_id), "--json").stdout)
    for event in logs["events"]:
        stats = ((event.get("result") or {}).get("ansible_stats") or {}).get("data") or {}
        if "fraisier_timers" in stats:
            return stats["fraisier_timers"]
    raise AssertionError(f"no fraisier_timers in the events of deployment {deployment_id}")


def timer_state(host, unit: str) -> tuple[str, str, str]:
    out = host.ssh(
        f"systemctl is-enabled {unit}; systemctl is-active {unit};"
        f" systemctl show -p NextElapseUSecRealtime --value {unit}"
    ).stdout.split("\n")
    return out[0], out[1], out[2]


SNAPSHOT = (
    f"find {APP} {UNITS} -printf '%p %y %s %T@ %l\\n' 2>/dev/null | sort;"
    " systemctl list-timers --all --no-legend | grep jobs- | awk '{print $(NF-1), $NF}'"
)

JOBS = {
    "daily": {"schedule": "0 2 * * *", "script_path": "bin/report"},
    # Cron runs this on every Friday and on every 13th: two OnCalendar lines.
    "friday13": {"schedule": "0 0 13 * fri", "command": "./bin/report friday"},
    "paused": {"schedule": "@hourly", "command": "true", "enabled": False},
}


def test_deploy_installs_timers_then_removes_dropped_jobs_only(tmp_path, state, host):
    repo = ExampleRepo(tmp_path / "jobs", "jobs")
    # A unit of the ops team, not installed by Fraisier, that Fraisier must never touch.
    host.ssh(
        f"printf '[Service]\\nType=oneshot\\nExecStart=/bin/true\\n' > {UNITS}/jobs-ops.service;"
        f" printf '[Timer]\\nOnCalendar=monthly\\n[Install]\\nWantedBy=timers.target\\n'"
        f" > {UNITS}/jobs-ops.timer; systemctl daemon-reload;"
        " systemctl enable --now jobs-ops.timer",
        check=True,
    )
    config = write_config(tmp_path, repo, host, JOBS)

    before = host.ssh(SNAPSHOT).stdout
    dry = deploy(config, "--dry-run")
    assert dry["rc"] == 0 and dry["status"] == "successful", dry
    assert host.ssh(SNAPSHOT).stdout == before
    # Even a dry run says when each timer would fire, from systemd-analyze on the host.
    planned = timers_recorded(config, dry["deployment_id"])[host.name]
    assert planned["jobs-daily.timer"].endswith(" 02:00:00 UTC")
    assert planned["jobs-paused.timer"] is None

    first = deploy(config)
    assert first["rc"] == 0 and first["status"] == "successful", first
    recorded = timers_recorded(config, first["deployment_id"])[host.name]
    for job in ("daily", "friday13"):
        enabled, active, elapse = timer_state(host, f"jobs-{job}.timer")
        assert (enabled, active) == ("enabled", "active")
        assert recorded[f"jobs-{job}.timer"] == elapse != ""
    assert timer_state(host, "jobs-paused.timer")[:2] == ("disabled", "inactive")
    timer = host.ssh(f"cat {UNITS}/jobs-friday13.timer").stdout
    assert "OnCalendar=Fri *-*-* 00:00:00\nOnCalendar=*-*-13 00:00:00\n" in timer
    # The job runs from the live release with the environment's vars.env.
    host.ssh("systemctl start jobs-friday13.service", check=True)
    assert host.ssh("cat /var/lib/jobs/report.log").stdout.startswith("report friday13 1 ")

    # friday13 leaves the config, weekly arrives; a new commit is deployed.
    jobs = {k: v for k, v in JOBS.items() if k != "friday13"}
    jobs["weekly"] = {"schedule": "30 7 * * mon", "script_path": "bin/report"}
    config = write_config(tmp_path, repo, host, jobs)
    repo.commit("version 2", {"VERSION": "2\n"})
    second = deploy(config)
    assert second["rc"] == 0, second
    listing = host.ssh(f"ls {UNITS}").stdout.split()
    assert "jobs-friday13.timer" not in listing and "jobs-friday13.service" not in listing
    assert host.ssh("systemctl is-active jobs-friday13.timer").stdout.strip() == "inactive"
    assert timer_state(host, "jobs-weekly.timer")[:2] == ("enabled", "active")
    assert timer_state(host, "jobs-ops.timer")[:2] == ("enabled", "active")
    assert {"jobs-ops.timer", "jobs-ops.service"} <= set(listing)
    manifest = json.loads(host.ssh(f"cat {APP}/.fraisier/units.json").stdout)
    assert "jobs-ops.timer" not in manifest["files"]
    assert "jobs-weekly.timer" in manifest["files"]

    # A unit that exists but that Fraisier did not install is never overwritten.
    clash = write_config(
        tmp_path, repo, host, {**jobs, "ops": {"schedule": "@daily", "command": "true"}}
    )
    repo.commit("version 3", {"VERSION": "3\n"})
    refused = deploy(clash)
    assert refused["rc"] == 1 and refused["status"] == "failed"
    assert "jobs-ops.service exists and was not installed by Fraisier" in refused["error"]
    assert "OnCalendar=monthly" in host.ssh(f"cat {UNITS}/jobs-ops.timer").stdout
    host.ssh(
        f"systemctl disable --now jobs-ops.timer; rm -f {UNITS}/jobs-ops.*; systemctl daemon-reload"
    )


def test_schedule_refused_by_systemd_installs_nothing(tmp_path, state, host):
    repo = ExampleRepo(tmp_path / "jobs", "jobs")
    # The config's own conversion always gives valid lines: pass broken ones directly,
    # as a user's vars could, to see the host's check stop the deployment.
    bad = [
        {"name": "broken", "service": "jobs-broken.service", "timer": "jobs-broken.timer",
         "on_calendar": ["*-*-* 25:00:00"], "command": "true"},
    ]  # fmt: skip
    config = write_config(
        tmp_path,
        repo,
        host,
        {"broken": {"schedule": "@daily", "command": "true"}},
        app_path="/srv/jobs-broken",
        vars={"fraise_scheduled_jobs": bad},
    )
    for args in (("--dry-run",), ()):
        result = deploy(config, *args)
        assert result["rc"] == 1 and result["status"] == "failed", result
        assert (
            "job broken: OnCalendar=*-*-* 25:00:00 is refused by systemd-analyze"
            in (result["error"])
        )
    assert host.ssh(f"test -e {UNITS}/jobs-broken.timer").returncode != 0
    assert host.ssh("test -L /srv/jobs-broken/current").returncode != 0
