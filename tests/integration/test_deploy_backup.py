"""`fraisier deploy` of a backup fraise (examples/jobs, bin/backup) on real systemd hosts:
retention, an rsync copy to a second host, and a failing backup that changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.support import ExampleRepo, fraisier

pytestmark = pytest.mark.hosts

APP = "/srv/backups"
DUMPS = "/var/backups/dump"
OFFSITE = "/var/backups/offsite"
COPY = "/srv/copy"
HELPER = "/usr/local/lib/fraisier/backup-retention"


@pytest.fixture(scope="module")
def pair(module_hosts):
    """A backup host that can reach the second (the rsync target) over ssh as root."""
    backup, target = module_hosts(2)
    key = Path(backup.private_key).read_text()
    backup.ssh(
        "install -d -m 700 /root/.ssh && cat > /root/.ssh/id_ed25519"
        " && chmod 600 /root/.ssh/id_ed25519"
        f" && ssh-keyscan {target.address} > /root/.ssh/known_hosts 2>/dev/null",
        input=key,
        check=True,
    )
    return backup, target


def write_config(tmp_path: Path, repo: ExampleRepo, backup, target) -> Path:
    env = {
        "branch": "main",
        "app_path": APP,
        "hosts": {backup.name: backup.inventory_vars},
        "jobs": {
            "dump": {
                "schedule": "@daily",
                "script_path": "bin/backup",
                "backup_dir": DUMPS,
                "retention_days": 7,
            },
            "offsite": {
                "schedule": "30 */6 * * *",
                "script_path": "bin/backup",
                "backup_dir": OFFSITE,
                "retention_days": 7,
                "remote": f"root@{target.address}:{COPY}",
                "depends_on": ["dump"],
            },
        },
    }
    data = {
        "fraises": {"backups": {"type": "backup", "repository": str(repo.path),
                                "environments": {"test": env}}},
    }  # fmt: skip
    path = tmp_path / "fraises.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def deploy(config: Path, *args: str) -> dict:
    out = fraisier(config, "deploy", "backups", "test", "--json", *args)
    assert out.stdout, out.stderr
    return {"rc": out.returncode, **json.loads(out.stdout)}


def listing(host, path: str) -> list[str]:
    return sorted(host.ssh(f"ls -1 {path} 2>/dev/null").stdout.split())


def age(host, path: str, days: int) -> None:
    host.ssh(f"echo old > {path} && touch -d '-{days} days' {path}", check=True)


def test_backup_jobs_keep_retention_copy_off_host_and_fail_safely(tmp_path, state, pair):
    backup, target = pair
    repo = ExampleRepo(tmp_path / "backups", "jobs")
    config = write_config(tmp_path, repo, backup, target)

    dry = deploy(config, "--dry-run")
    assert dry["rc"] == 0 and dry["status"] == "successful", dry
    assert backup.ssh(f"test -e {APP} || test -e {DUMPS} || test -e {HELPER}").returncode != 0

    first = deploy(config)
    assert first["rc"] == 0 and first["status"] == "successful", first
    unit = backup.ssh("cat /etc/systemd/system/backups-offsite.service").stdout
    assert "Requires=backups-dump.service\nAfter=backups-dump.service\n" in unit
    for timer in ("backups-dump.timer", "backups-offsite.timer"):
        assert backup.ssh(f"systemctl is-active {timer}").stdout.strip() == "active"

    # Retention after a successful run: older than 7 days goes, newer stays.
    age(backup, f"{DUMPS}/old-10d.sql", 10)
    age(backup, f"{DUMPS}/old-8d.sql", 8)
    age(backup, f"{DUMPS}/recent-6d.sql", 6)
    backup.ssh("systemctl start backups-dump.service", check=True)
    kept = listing(backup, DUMPS)
    assert [f for f in kept if not f.startswith("backup-")] == ["recent-6d.sql"]
    assert len([f for f in kept if f.startswith("backup-")]) == 1

    # The newest backup stays however old it is.
    backup.ssh("mkdir -p /tmp/aged", check=True)
    for name, days in (("a.sql", 30), ("b.sql", 20), ("c.sql", 12)):
        age(backup, f"/tmp/aged/{name}", days)
    backup.ssh(f"{HELPER} --dir /tmp/aged --keep-days 7", check=True)
    assert listing(backup, "/tmp/aged") == ["c.sql"]

    # offsite depends on dump (which runs first), then copies to the second host.
    backup.ssh("systemctl start backups-offsite.service", check=True)
    copied = listing(target, COPY)
    assert copied == listing(backup, OFFSITE) and len(copied) == 1
    assert len([f for f in listing(backup, DUMPS) if f.startswith("backup-")]) == 2

    # A failing backup: older backups untouched, nothing synced.
    age(backup, f"{OFFSITE}/old-9d.sql", 9)
    backup.ssh(f"touch {OFFSITE}/FAIL", check=True)
    before = listing(backup, OFFSITE)
    run = backup.ssh("systemctl start backups-offsite.service")
    assert run.returncode != 0
    assert listing(backup, OFFSITE) == before
    assert listing(target, COPY) == copied
    assert "refusing to run" in backup.ssh("journalctl -u backups-offsite.service").stdout
