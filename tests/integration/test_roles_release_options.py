"""fraise_release's unpack-call options on real systemd hosts, through Fraisier's runner.

The batch barrier without any_errors_fatal, prepare steps, archives sent inside the call or
uploaded, a release-shipped unit in a dry run, and the fraisier_live report. Each test
deploys its own app path, so the two module hosts are shared.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from fraisier.resources import builtin_playbook
from fraisier.runner import PlaybookRun, PlaybookRunner
from fraisier.store.writer import event_values

pytestmark = pytest.mark.hosts

# The action sends an archive up to this size inside the module call, a larger one as a file.
INLINE_LIMIT = 1024 * 1024

# fraise_release alone, as an ops team's own playbook uses it. No any_errors_fatal: only the
# batch barrier keeps a host from switching while another host of its batch has failed.
RELEASE_PLAYBOOK = """\
- name: Deploy a release
  hosts: fraisier_targets
  gather_facts: false
  tasks:
    - name: Unpack, build and prepare the release
      ansible.builtin.import_role:
        name: fraise_release
        tasks_from: unpack.yml

    - name: Switch to the release
      ansible.builtin.import_role:
        name: fraise_release
        tasks_from: switch.yml
      vars:
        fraise_release_confirm: false
        fraise_release_cleanup: false
        fraise_release_batch: "{{ fraise_release_state.batch }}"
      when: not test_unpack_only | default(false)

    - name: Record the release as good
      ansible.builtin.import_role:
        name: fraise_release
        tasks_from: confirm.yml
      vars:
        fraise_release_report: true
      when: not test_unpack_only | default(false)
"""

# Confirming on its own, as after checks that follow a switch.
CONFIRM_PLAYBOOK = """\
- name: Confirm the live release
  hosts: fraisier_targets
  gather_facts: false
  tasks:
    - name: Record the live release as good
      ansible.builtin.import_role:
        name: fraise_release
        tasks_from: confirm.yml
      vars:
        fraise_release_report: true
"""

# One line a path below a release dir, then one line a file with its checksum: what must be
# the same wherever and however the tree was unpacked (sizes of dirs and mtimes may differ).
LISTING = (
    "cd {path} && find . -mindepth 1 ! -name .fraisier-release -printf '%P %y %m %l\\n' | sort"
    " && find . -type f ! -name .fraisier-release -exec sha256sum {{}} + | sort -k2"
)


@pytest.fixture(scope="module")
def two_hosts(module_hosts):
    """Two hosts shared by the tests of this module."""
    return module_hosts(2)


@pytest.fixture(scope="module")
def playbooks(tmp_path_factory) -> dict[str, Path]:
    """The test playbooks, written once, plus the built-in api playbook."""
    folder = tmp_path_factory.mktemp("playbooks")
    (folder / "release.yml").write_text(RELEASE_PLAYBOOK)
    (folder / "confirm.yml").write_text(CONFIRM_PLAYBOOK)
    return {
        "release": folder / "release.yml",
        "confirm": folder / "confirm.yml",
        "api": builtin_playbook("api"),
    }


@dataclass
class Outcome:
    """What one playbook run left: its status, every event and the published stats."""

    status: str
    events: list[dict]
    stats: dict
    private_data_dir: Path

    @property
    def live(self):
        """The fraisier_live stat, or None when nothing was published."""
        return self.stats.get("fraisier_live")

    def failures(self) -> dict[str, str]:
        """Message of each host's failed task (errors that were not ignored)."""
        return {
            e["event_data"]["host"]: e["event_data"]["res"].get("msg", "")
            for e in self.events
            if e["event"] == "runner_on_failed" and not e["event_data"].get("ignore_errors")
        }

    def unpacked(self) -> dict[str, dict]:
        """Result of the unpack call on each host."""
        return {
            e["event_data"]["host"]: e["event_data"]["res"]
            for e in self.events
            if e["event"] in ("runner_on_ok", "runner_on_failed")
            and (e["event_data"]["res"].get("invocation") or {}).get("module_args", {}).get("state")
            == "unpack"
        }


class App:
    """One app path on the module's hosts, deployed through Fraisier's PlaybookRunner."""

    def __init__(self, tmp: Path, hosts, name: str, playbooks: dict[str, Path]):
        self.tmp = tmp
        self.hosts = hosts
        self.name = name
        self.path = f"/srv/{name}"
        self.playbooks = playbooks
        self.runs = itertools.count(1)

    def tree(self, release_id: str, files: dict[str, str | bytes]) -> Path:
        """Write a release tree on the controller; modes are set, not left to the umask."""
        root = self.tmp / "trees" / release_id
        for rel, content in files.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
            target.chmod(0o755 if rel.endswith(".sh") else 0o644)
        root.mkdir(parents=True, exist_ok=True)
        return root

    def archive(self, release_id: str, tree: Path | None = None, compresslevel: int = 9) -> Path:
        """Pack a tree (by default one holding VERSION) as the release's .tar.gz."""
        tree = tree or self.tree(release_id, {"VERSION": f"{release_id}\n"})
        archive = self.tmp / f"{release_id}.tar.gz"
        with tarfile.open(archive, "w:gz", compresslevel=compresslevel) as tar:
            tar.add(tree, arcname=".")
        return archive

    def run(
        self,
        release_id: str | None,
        playbook: str = "release",
        check: bool = False,
        forks: int | None = None,
        host_vars: dict[str, dict] | None = None,
        **extra,
    ) -> Outcome:
        """Run a playbook on the hosts through PlaybookRunner; every event is kept."""
        inventory = {
            "all": {
                "children": {
                    "fraisier_targets": {
                        "hosts": {
                            h.name: {**h.inventory_vars, **(host_vars or {}).get(h.name, {})}
                            for h in self.hosts
                        }
                    }
                }
            }
        }
        extravars = {"fraise_release_app_path": self.path, **extra}
        if release_id:
            extravars["fraise_release_id"] = release_id
            archive = self.tmp / f"{release_id}.tar.gz"
            if archive.exists():
                extravars["fraise_release_archive"] = str(archive)
        events: list[dict] = []
        runner = PlaybookRunner(
            PlaybookRun(
                name=f"{self.name}-{next(self.runs)}",
                playbook=self.playbooks[playbook],
                inventory=inventory,
                extravars=extravars,
                check=check,
                diff=check,
                forks=forks,
            ),
            work_dir=self.tmp / "work",
            on_event=events.append,
        )
        outcome = runner.run()
        return Outcome(outcome.status, events, outcome.artifact_data, outcome.private_data_dir)

    def sh(self, host, command: str) -> str:
        return host.ssh(command).stdout.strip()

    def current(self, host) -> str:
        """Where `current` points on the host ('' when there is no link)."""
        return self.sh(host, f"readlink {self.path}/current")

    def layout(self, host) -> dict[str, str]:
        """current, pending and history of the app on the host."""
        out = self.sh(
            host,
            f"cd {self.path} && echo current=$(readlink current);"
            "echo pending=$(cat .fraisier/pending 2>/dev/null);"
            "echo history=$(cat .fraisier/history 2>/dev/null)",
        )
        return dict(line.split("=", 1) for line in out.splitlines())

    def exists(self, host, path: str) -> bool:
        return self.sh(host, f"test -e {path} && echo yes || echo no") == "yes"


@pytest.fixture
def app(request, tmp_path, two_hosts, playbooks):
    """A fresh app path on both hosts; it and its unit are removed afterwards."""
    name = "opt" + request.node.name.removeprefix("test_").replace("_", "")[:16]
    app = App(tmp_path, list(two_hosts), name, playbooks)
    yield app
    for host in app.hosts:
        host.ssh(
            f"systemctl stop {name}.service 2>/dev/null;"
            f"rm -rf /srv/{name} /etc/systemd/system/{name}.service; systemctl daemon-reload"
        )


@pytest.fixture(scope="module")
def more_hosts(two_hosts, module_hosts):
    """The module's two hosts and one more, for a batch larger than the forks."""
    return [*two_hosts, *module_hosts(1)]


def test_batch_barrier_without_any_errors_fatal_switches_no_host(app):
    good, bad = app.hosts
    app.archive("r1")
    first = app.run("r1")
    assert first.status == "successful", first.failures()

    app.archive("r2")
    # Only the second host fails its build; the play does not make that fatal to the first.
    build = (
        f'[ "$(hostname)" != {bad.name} ] || {{ echo "no compiler on $(hostname)" >&2; exit 7; }}'
    )
    outcome = app.run("r2", fraise_release_build=build)
    assert outcome.status == "failed"
    assert outcome.failures() == {
        bad.name: f"build of release r2 failed with exit code 7: no compiler on {bad.name}",
        good.name: f"{bad.name} failed before the switch: no host of this batch switches to r2",
    }
    # The first host unpacked and built r2, and still did not switch to it.
    assert app.exists(good, f"{app.path}/releases/r2/.fraisier-built")
    for host in app.hosts:
        assert app.layout(host) == {"current": "releases/r1", "pending": "", "history": "r1"}
    assert outcome.live is None


def test_failing_migration_stops_before_the_switch_and_names_the_step(app):
    steps = [
        {"name": "migration", "command": "echo migrated >> MIGRATED"},
        {"name": "compile", "command": "test -f MIGRATED && touch COMPILED"},
    ]
    app.archive("r1")
    assert app.run("r1", fraise_release_prepare=steps).status == "successful"
    r1 = f"{app.path}/releases/r1"
    for host in app.hosts:
        assert app.sh(host, f"cat {r1}/MIGRATED; ls {r1}/COMPILED") == f"migrated\n{r1}/COMPILED"

    app.archive("r2")
    failing = [
        {"name": "migration", "command": "echo 'relation users already exists' >&2; exit 4"},
        {"name": "compile", "command": "touch COMPILED"},
    ]
    outcome = app.run("r2", fraise_release_prepare=failing)
    assert outcome.status == "failed"
    assert outcome.failures() == {
        h.name: "migration of release r2 failed with exit code 4: relation users already exists"
        for h in app.hosts
    }
    r2 = f"{app.path}/releases/r2"
    for host in app.hosts:
        assert app.layout(host) == {"current": "releases/r1", "pending": "", "history": "r1"}
        assert app.exists(host, f"{r2}/.fraisier-release")
        assert not app.exists(host, f"{r2}/COMPILED")

    # r2 is unpacked but not live: a dry run would prepare it, and runs nothing.
    dry = [{"name": "migration", "command": "touch DRY_RUN_MIGRATED"}]
    outcome = app.run("r2", check=True, fraise_release_prepare=dry)
    assert outcome.status == "successful", outcome.failures()
    assert {h: (r["changed"], r["msg"]) for h, r in outcome.unpacked().items()} == {
        h.name: (True, "release r2 would be prepared") for h in app.hosts
    }
    for host in app.hosts:
        assert not app.exists(host, f"{r2}/DRY_RUN_MIGRATED")
        assert app.current(host) == "releases/r1"


def same_tree() -> dict[str, str | bytes]:
    """A tree that gzip -9 packs well under the inline limit and gzip -0 well above it."""
    return {
        "VERSION": "same tree\n",
        "data/big.txt": ("fraisier " * 8 + "\n") * 20000,
        "data/noise.bin": os.urandom(4096),
        "bin/run.sh": "#!/bin/sh\necho run\n",
        "conf/app.ini": "[app]\nname = same\n",
    }


def test_small_archive_travels_in_the_call_large_one_is_uploaded_same_tree(app):
    tree = app.tree("src", same_tree())
    (tree / "latest").symlink_to("data/big.txt")
    (tree / "var/cache").mkdir(parents=True)
    for folder in ("var", "var/cache", "data", "bin", "conf"):
        (tree / folder).chmod(0o755)
    small = app.archive("small", tree, compresslevel=9)
    large = app.archive("large", tree, compresslevel=0)
    assert small.stat().st_size < INLINE_LIMIT < large.stat().st_size
    expected = subprocess.run(
        ["sh", "-c", LISTING.format(path=tree)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert "latest l 777 data/big.txt" in expected and "var/cache d 755" in expected

    # One release, one run: the first host gets the small archive, the second the large one.
    inline, uploaded = app.hosts
    outcome = app.run(
        "r1",
        host_vars={
            inline.name: {"fraise_release_archive": str(small)},
            uploaded.name: {"fraise_release_archive": str(large)},
        },
    )
    assert outcome.status == "successful", outcome.failures()
    sent = outcome.unpacked()[inline.name]["invocation"]["module_args"]
    assert sent["archive_content"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert sent["archive"] is None
    sent = outcome.unpacked()[uploaded.name]["invocation"]["module_args"]
    assert sent["archive_content"] is None
    assert sent["archive"].startswith("/root/.ansible/tmp/")
    # The uploaded archive and its temporary dir are gone once unpacked.
    assert not app.exists(uploaded, os.path.dirname(sent["archive"]))
    for host in app.hosts:
        listing = app.sh(host, LISTING.format(path=f"{app.path}/releases/r1"))
        assert listing == expected, host.name
        assert app.current(host) == "releases/r1"

    # The archive travelled base64-encoded in the module call: no piece of it may reach
    # the events as runner hands them over, as the store keeps them, or runner's files.
    encoded = base64.b64encode(small.read_bytes()).decode()
    pieces = [encoded[8:72], encoded[len(encoded) // 2 :][:64], encoded[-72:-8]]
    texts = [json.dumps(e, default=str) for e in outcome.events]
    texts += [
        json.dumps(event_values(1, e, fallback_seq=n), default=str)
        for n, e in enumerate(outcome.events)
    ]
    texts += [
        p.read_bytes().decode("latin-1") for p in outcome.private_data_dir.rglob("*") if p.is_file()
    ]
    assert len(outcome.events) > 10
    leaks = [piece for piece in pieces for text in texts if piece in text]
    assert leaks == []


UNIT = """\
[Unit]
Description={description}

[Service]
Type=simple
ExecStart=/bin/sleep infinity
"""


def test_release_shipped_unit_in_a_dry_run_changes_nothing(app):
    unit = f"{app.name}.service"
    unit_path = f"/etc/systemd/system/{unit}"
    tree = app.tree(
        "r1",
        {
            "VERSION": "r1\n",
            f"systemd/{unit}": UNIT.format(description="shipped with r1"),
        },
    )
    app.archive("r1", tree)
    api = {"playbook": "api", "fraise_api_systemd_service": unit, "fraisier_environment": "test"}
    snapshot = (
        f"sha256sum {unit_path} 2>&1; stat -c '%y %a' {unit_path} 2>&1;"
        f"systemctl show -p LoadState -p Description -p NeedDaemonReload -p MainPID {unit};"
        f"find {app.path} -printf '%p %l %T@\\n' 2>&1 | sort"
    )
    # r1 unpacked for real, without its unit. On the first host an older unit runs and its
    # file was edited since, so that a daemon-reload or a restart would show; the second
    # host has no unit at all.
    assert app.run("r1", test_unpack_only=True).status == "successful"
    edited = app.hosts[0]
    loaded, edited_text = (UNIT.format(description=d) for d in ("loaded", "edited since"))
    edited.ssh(f"cat > {unit_path} && systemctl daemon-reload", input=loaded, check=True)
    edited.ssh(f"systemctl start {unit}", check=True)
    edited.ssh(f"cat > {unit_path}", input=edited_text, check=True)
    before = [app.sh(h, snapshot) for h in app.hosts]
    assert "Description=loaded" in before[0] and "NeedDaemonReload=yes" in before[0]
    assert "MainPID=0" not in before[0]
    assert "LoadState=not-found" in before[1] and "No such file" in before[1]

    outcome = app.run("r1", check=True, **api)
    assert outcome.status == "successful", outcome.failures()
    for host in app.hosts:
        # The dry run read the shipped unit and would write it: it differs on both hosts.
        assert outcome.unpacked()[host.name]["unit"] == {
            "name": unit,
            "path": unit_path,
            "managed": True,
            "changed": True,
        }
    assert [app.sh(h, snapshot) for h in app.hosts] == before
    for host in app.hosts:
        assert app.current(host) == ""


def test_confirm_reports_the_live_release_and_a_dry_run_reports_nothing(app):
    app.archive("r1")
    outcome = app.run("r1")
    assert outcome.status == "successful", outcome.failures()
    assert outcome.live == {h.name: "r1" for h in app.hosts}

    app.archive("r2")
    dry = app.run("r2", check=True)
    assert dry.status == "successful", dry.failures()
    assert dry.live is None
    assert "fraisier_live" not in json.dumps([e.get("event_data") for e in dry.events])
    for host in app.hosts:
        assert app.current(host) == "releases/r1"


def test_confirm_alone_reports_the_release_it_confirmed(app):
    app.archive("r1")
    assert app.run("r1").status == "successful"
    # r2 is being deployed (kept by the cleanup) while r1 is live: r1 is what is confirmed.
    outcome = app.run("r2", playbook="confirm")
    assert outcome.status == "successful", outcome.failures()
    for host in app.hosts:
        assert app.layout(host) == {"current": "releases/r1", "pending": "", "history": "r1"}
    assert outcome.live == {h.name: "r1" for h in app.hosts}


def test_batch_barrier_holds_when_the_batch_outnumbers_the_forks(app, more_hosts):
    app.hosts = more_hosts
    app.archive("r1")
    failing, *others = more_hosts
    build = f'[ "$(hostname)" != {failing.name} ] || {{ echo broken >&2; exit 7; }}'
    # One fork: each host's unpack is queued only once the one before it has finished.
    outcome = app.run("r1", forks=1, fraise_release_build=build)
    assert outcome.status == "failed"
    assert {h.name: app.current(h) for h in more_hosts} == {h.name: "" for h in more_hosts}
    assert outcome.failures() == {
        failing.name: "build of release r1 failed with exit code 7: broken",
        **{
            h.name: f"{failing.name} failed before the switch: no host of this batch switches to r1"
            for h in others
        },
    }
