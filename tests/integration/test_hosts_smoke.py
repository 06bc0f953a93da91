"""The test hosts themselves: they boot, Ansible reaches them, they are isolated, and they stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.hosts import (
    HostError,
    Root,
    boot_hosts,
    inventory,
    load_state,
    stop_hosts,
    write_inventory,
)
from tests.hosts import env as hosts_env
from tests.hosts.fixtures import HostFactory, require_hosts
from tests.hosts.machines import Host, _alive

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = Path(sys.executable).parent / "ansible"


def ansible_ping(inventory_file: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        [str(ANSIBLE), "all", "-i", str(inventory_file), "-m", "ansible.builtin.ping", "-o",
         "-f", "10"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def no_process_left(*pids_and_starts: tuple[int | None, str]) -> bool:
    deadline = time.monotonic() + 5
    while any(_alive(pid, start) for pid, start in pids_and_starts):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def three_hosts(module_hosts) -> list[Host]:
    return module_hosts(3)


@pytest.mark.hosts
def test_three_hosts_answer_ansible_ping(three_hosts, tmp_path):
    booted = three_hosts
    inventory_file = write_inventory(booted, tmp_path / "inventory.yml", group="web")

    result = ansible_ping(inventory_file)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for host in booted:
        assert any(line.startswith(f"{host.name} | SUCCESS") and '"pong"' in line for line in lines)
    assert len({host.address for host in booted}) == 3


@pytest.mark.hosts
def test_each_host_runs_systemd_on_its_own_address(module_hosts):
    host = module_hosts(1)[0]

    result = host.ssh("systemctl is-system-running; hostname; ss -ltnpH 'sport = :22'", check=True)

    state, hostname, *listeners = result.stdout.splitlines()
    assert state in {"running", "degraded"}
    assert hostname == host.name
    # All hosts share one network; -p names processes of this host's PID namespace only.
    own = [line.split()[3] for line in listeners if "sshd" in line]
    assert own == [f"{host.address}:22"]


@pytest.mark.hosts
def test_same_unit_started_at_once_on_every_host_runs_in_each_hosts_own_cgroup(three_hosts):
    unit = "[Service]\nExecStart=/bin/sleep infinity\n"
    for host in three_hosts:
        host.ssh("cat > /etc/systemd/system/fraisier-same.service", input=unit, check=True)
        host.ssh("systemctl daemon-reload", check=True)

    for action in ("start", "stop", "start", "restart"):
        runs = [
            subprocess.Popen(host.ssh_command(f"systemctl {action} fraisier-same.service"),
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for host in three_hosts
        ]  # fmt: skip
        failures = [run.stderr.read() for run in runs if run.wait(timeout=60) != 0]
        assert failures == [], action

    for host in three_hosts:
        assert host.ssh("systemctl is-active fraisier-same.service").stdout.strip() == "active"
        main_pid = host.ssh("systemctl show -P MainPID fraisier-same.service").stdout.strip()
        assert int(main_pid) > 0
        assert (
            f"/fraisier-testhosts/{host.address}/"
            in Path(f"/proc/{host.init_pid}/cgroup").read_text()
        )


@pytest.mark.hosts
def test_command_line_boots_lists_and_stops_hosts_by_state_file(testhost_root, tmp_path):
    state = tmp_path / "state.json"
    command = [sys.executable, "-m", "tests.hosts"]

    up = subprocess.run([*command, "up", "--name", "cli-1", "--state", str(state)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    hosts_up = load_state(state)
    try:
        assert up.returncode == 0, up.stderr
        assert "cli-1:" in up.stdout and "ansible_host: 127.0.2." in up.stdout
        status = subprocess.run([*command, "status", "--format", "json"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert hosts_up[0].pid in {record["pid"] for record in json.loads(status.stdout)}

        down = subprocess.run([*command, "down", "--state", str(state)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

        assert down.returncode == 0, down.stderr
        assert not state.exists()
        assert no_process_left(*[(host.pid, host.pid_start) for host in hosts_up])
    finally:
        stop_hosts(hosts_up)


@pytest.mark.hosts
def test_unit_enabled_on_one_host_is_absent_on_another(hosts, testhost_root):
    first, second = hosts(2)
    unit = textwrap.dedent("""\
        [Unit]
        Description=Probe of overlay isolation
        [Service]
        Type=oneshot
        RemainAfterExit=yes
        ExecStart=/bin/true
        [Install]
        WantedBy=multi-user.target
    """)

    first.ssh("cat > /etc/systemd/system/fraisier-probe.service", input=unit, check=True)
    first.ssh(
        "systemctl daemon-reload && systemctl enable --now fraisier-probe.service", check=True
    )

    assert first.ssh("systemctl is-active fraisier-probe.service").stdout.strip() == "active"
    absent = second.ssh("systemctl is-enabled fraisier-probe.service")
    assert absent.returncode != 0
    assert second.ssh("test -e /etc/systemd/system/fraisier-probe.service").returncode == 1
    assert not (testhost_root.path / "etc/systemd/system/fraisier-probe.service").exists()


@pytest.mark.hosts
def test_stopped_host_is_unreachable_and_teardown_still_succeeds(testhost_root, tmp_path):
    factory = HostFactory(testhost_root)
    try:
        alive, stopped = factory(2)
        stopped.stop()
        assert not stopped.is_running()

        result = ansible_ping(write_inventory([alive, stopped], tmp_path / "inventory.yml"))

        assert result.returncode != 0
        assert f"{stopped.name} | UNREACHABLE" in result.stdout
        assert f"{alive.name} | SUCCESS" in result.stdout
    finally:
        factory.stop_all()
    assert no_process_left(
        (alive.pid, alive.pid_start), (alive.init_pid, alive.init_start),
        (stopped.pid, stopped.pid_start), (stopped.init_pid, stopped.init_start),
    )  # fmt: skip
    assert not (alive.dir / "host.json").exists()


BOOT_ONE = """
import json, os, signal, sys, time
from tests.hosts import boot_hosts
# A shell without job control starts background commands with SIGINT ignored, and Python
# then installs no KeyboardInterrupt: Ctrl-C must reach this process as it would a terminal's.
signal.signal(signal.SIGINT, signal.default_int_handler)
host = boot_hosts(1)[0]
print(json.dumps(host.to_record()), flush=True)
mode = sys.argv[1]
if mode == "error":
    raise RuntimeError("test body failed")
if mode in ("sigterm", "sigint", "sigkill"):
    time.sleep(120)
"""


@pytest.mark.hosts
@pytest.mark.parametrize("ending", ["exit", "error", "sigterm", "sigint"])
def test_process_that_boots_hosts_stops_them_however_it_ends(testhost_root, ending):
    process = subprocess.Popen(
        [sys.executable, "-c", BOOT_ONE, ending],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    host = Host.from_record(json.loads(process.stdout.readline()))
    try:
        assert host.is_running()
        if ending in ("sigterm", "sigint"):
            process.send_signal(signal.SIGTERM if ending == "sigterm" else signal.SIGINT)
        process.wait(timeout=60)
        assert no_process_left((host.pid, host.pid_start), (host.init_pid, host.init_start))
    finally:
        process.kill()
        process.wait()
        stop_hosts([host])


def orphan_of_killed_session() -> Host:
    """A host booted by a session that was then SIGKILLed: nothing stopped it."""
    process = subprocess.Popen(
        [sys.executable, "-c", BOOT_ONE, "sigkill"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    orphan = Host.from_record(json.loads(process.stdout.readline()))
    process.kill()
    process.wait()
    return orphan


@pytest.mark.hosts
def test_host_of_a_killed_session_is_reaped_by_the_next_one(testhost_root):
    orphan = orphan_of_killed_session()
    booted: list[Host] = []
    try:
        # SIGKILL runs no handler: the host outlives its session until someone claims addresses.
        assert orphan.is_running()
        booted = boot_hosts(1, root=testhost_root)
        assert no_process_left((orphan.pid, orphan.pid_start), (orphan.init_pid, orphan.init_start))
    finally:
        stop_hosts([orphan, *booted])


@pytest.mark.hosts
def test_orphan_above_a_free_address_is_reaped_too(testhost_root):
    # The orphan takes an address above a host of ours; once that host stops, the next
    # claim finds a free address below the orphan and must reap it all the same.
    below = boot_hosts(1, root=testhost_root)
    orphan = orphan_of_killed_session()
    booted: list[Host] = []
    try:
        octet = lambda host: int(host.address.rsplit(".", 1)[1])  # noqa: E731
        assert octet(orphan) > octet(below[0])
        stop_hosts(below)
        assert orphan.is_running()
        booted = boot_hosts(1, root=testhost_root)
        assert booted[0].address == below[0].address
        assert no_process_left((orphan.pid, orphan.pid_start), (orphan.init_pid, orphan.init_start))
    finally:
        stop_hosts([orphan, *below, *booted])


@pytest.mark.hosts
def test_failing_test_stops_its_hosts(tmp_path):
    record = tmp_path / "host.json"
    test_file = tmp_path / "test_fails.py"
    test_file.write_text(
        textwrap.dedent(f"""\
        import json
        def test_fails(hosts):
            host = hosts(1)[0]
            open({str(record)!r}, "w").write(json.dumps(host.to_record()))
            assert False, "the test body failed"
    """)
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.hosts.fixtures", "--rootdir",
         str(tmp_path), str(test_file)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the test body failed" in result.stdout
    host = Host.from_record(json.loads(record.read_text()))
    assert no_process_left((host.pid, host.pid_start), (host.init_pid, host.init_start))


@pytest.mark.hosts
def test_boot_failure_names_the_host_and_shows_its_log(tmp_path):
    empty = tmp_path / "not-a-root"
    empty.mkdir()
    key = tmp_path / "key"

    with pytest.raises(HostError) as raised:
        boot_hosts(1, names=["broken"], root=Root(empty, key, key), timeout=20)

    message = str(raised.value)
    assert "broken (127.0.2." in message
    assert "console log" in message
    assert str(empty) in message  # systemd-nspawn's own complaint, from the log tail


def test_inventory_lists_each_host_with_its_connection_vars():
    host = Host(name="web-1", address="127.0.2.9", pid=1, private_key="/k", root="/r")

    plain = inventory([host])
    grouped = inventory([host], group="web", extra_vars={"fraise": "api"})

    assert plain == {"all": {"hosts": {"web-1": host.inventory_vars}}}
    assert grouped["all"]["children"]["web"]["hosts"]["web-1"]["ansible_host"] == "127.0.2.9"
    assert grouped["all"]["vars"] == {"fraise": "api"}
    assert host.inventory_vars["ansible_ssh_common_args"] == (
        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    )


def test_missing_packages_give_one_message_with_the_install_command(monkeypatch):
    monkeypatch.setattr(hosts_env.os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        hosts_env.shutil,
        "which",
        lambda cmd: None if cmd in {"systemd-nspawn", "debootstrap"} else cmd,
    )

    message = hosts_env.missing_requirements()

    assert message == (
        "systemd-nspawn, debootstrap not found: apt-get install -y debootstrap systemd-container"
    )


def test_not_root_is_named(monkeypatch):
    monkeypatch.setattr(hosts_env.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(hosts_env.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")

    assert "need root" in hosts_env.missing_requirements()


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_requirements_skip_outside_ci_and_fail_in_ci(monkeypatch, ci, outcome):
    monkeypatch.setattr(
        "tests.hosts.fixtures.missing_requirements",
        lambda: "systemd-nspawn not found: apt-get install -y systemd-container",
    )
    monkeypatch.setenv("CI", ci)

    with pytest.raises(outcome, match="apt-get install -y systemd-container"):
        require_hosts()
