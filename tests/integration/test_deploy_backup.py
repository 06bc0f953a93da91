"""`fraisier deploy` of a backup fraise (examples/jobs, bin/backup) on real systemd hosts:
retention, an rsync copy to a second host, and a failing backup that changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.hosts

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "jobs"
GIT = ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com"]
APP = "/srv/backups"
DUMPS = "/var/backups/dump"
OFFSITE = "/var/backups/offsite"
COPY = "/srv/copy"
HELPER = "/usr/local/lib/fraisier/backup-retention"


class JobsRepo:
    """A real git repository holding examples/jobs."""

    def __init__(self, path: Path):
        self.path = path
        shutil.copytree(EXAMPLE, path)
        self.git("init", "-q", "-b", "main")
        self.commit("version 1", {})

    def git(self, *args: str) -> str:
        out = subprocess.run(
            [*GIT, *args], cwd=self.path, check=True, capture_output=True, text=True
        )
        return out.stdout.strip()

    def commit(self, message: str, files: dict[str, str]) -> str:
        for name, content in files.items():
            (self.path / name).write_text(content)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


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


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAISIER_DB_PATH", str(tmp_path / "state" / "fraisier.db"))
    monkeypatch.setenv("FRAISIER_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.delenv("FRAISIER_DATABASE_URL", raising=False)
    return tmp_path


def write_config(tmp_path: Path, repo: JobsRepo, backup, target) -> Path:
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


def fraisier(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fraisier", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


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
    repo = JobsRepo(tmp_path / "backups")
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
