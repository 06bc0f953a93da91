"""Boot, reach and stop systemd hosts (systemd-nspawn containers) on loopback addresses."""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .env import HostError, run_dir
from .rootfs import Root, ensure_root

ADDRESS_PREFIX = "127.0.2."
# systemd-nspawn takes --machine as the host name: letters, digits, hyphens.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
OCTETS = range(1, 255)
BOOT_TIMEOUT = float(os.environ.get("FRAISIER_TESTHOSTS_BOOT_TIMEOUT", "90"))
STOP_GRACE = 10.0
SSH_COMMON_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"

# Hosts booted by this process and not stopped yet: stopped at exit whatever happens.
_LIVE: dict[str, Host] = {}
# Popen objects of our own nspawn children, kept so that stopping one also reaps it.
_CHILDREN: dict[int, subprocess.Popen] = {}
_HOOKS_INSTALLED = False


@dataclass
class Host:
    """One running systemd host, reachable over SSH as root at `address`."""

    name: str
    address: str
    pid: int
    private_key: str
    root: str
    pid_start: str = ""
    init_pid: int | None = None
    init_start: str = ""
    owner: int = field(default_factory=os.getpid)
    detached: bool = False

    @property
    def dir(self) -> Path:
        """Folder of this host's listen.conf, console log and record."""
        return run_dir() / self.address

    @property
    def log_path(self) -> Path:
        """Console output of systemd-nspawn and the host's systemd."""
        return self.dir / "console.log"

    @property
    def inventory_vars(self) -> dict:
        """Ansible connection variables that reach this host."""
        return {
            "ansible_host": self.address,
            "ansible_port": 22,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": self.private_key,
            "ansible_ssh_common_args": SSH_COMMON_ARGS,
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def ssh_command(self, command: str | None = None, connect_timeout: int = 5) -> list[str]:
        """The ssh argv that runs `command` on this host as root."""
        argv = [
            "ssh", "-i", self.private_key, "-p", "22",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={connect_timeout}",
            f"root@{self.address}",
        ]  # fmt: skip
        if command is not None:
            argv.append(command)
        return argv

    def ssh(
        self, command: str, check: bool = False, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run a shell command on the host; stdout and stderr come back as text."""
        return subprocess.run(
            self.ssh_command(command),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def is_running(self) -> bool:
        """True while this host's systemd-nspawn or its container init is alive."""
        return _alive(self.pid, self.pid_start) or _alive(self.init_pid, self.init_start)

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the console log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Power the host off (SIGTERM to systemd-nspawn), killing it after `grace` seconds."""
        stop_hosts([self], grace)

    def _finish_stop(self, grace: float) -> None:
        # A second SIGTERM would make systemd-nspawn kill the container at once: the
        # caller sent the only one, here we wait and then escalate.
        _wait_gone(self.pid, self.pid_start, grace)
        if self.is_running():
            # Killing the container's init ends its whole PID namespace; killing only
            # systemd-nspawn would leave the container running without a parent.
            if self.init_pid is None:
                self.init_pid, self.init_start = _container_init(self.pid)
            if _alive(self.init_pid, self.init_start):
                _signal(self.init_pid, signal.SIGKILL)
            if _alive(self.pid, self.pid_start):
                _signal(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, self.pid_start, 5)
            _wait_gone(self.init_pid, self.init_start, 5)
        child = _CHILDREN.pop(self.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        _LIVE.pop(self.address, None)
        _remove_cgroups(self.address)
        if self.is_running():
            raise HostError(
                f"host {self.name} ({self.address}) is still running after SIGKILL to PID "
                f"{self.pid}: stop it with `kill -9 {self.pid}` and check {self.log_path}"
            )
        record = self.dir / "host.json"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text()).get("pid") == self.pid:
                record.unlink()

    def to_record(self) -> dict:
        """JSON-ready form, as kept in the run folder and in state files."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> Host:
        """Rebuild a Host from `to_record()` output."""
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in record.items() if key in known})


def inventory(
    hosts: Iterable[Host], group: str | None = None, extra_vars: dict | None = None
) -> dict:
    """Ansible YAML inventory (as a dict) naming each host with its connection variables."""
    members = {host.name: dict(host.inventory_vars) for host in hosts}
    if group is None:
        body: dict = {"hosts": members}
    else:
        body = {"children": {group: {"hosts": members}}}
    if extra_vars:
        body["vars"] = dict(extra_vars)
    return {"all": body}


def write_inventory(
    hosts: Iterable[Host],
    path: str | os.PathLike,
    group: str | None = None,
    extra_vars: dict | None = None,
) -> Path:
    """Write `inventory(hosts, group)` as YAML to `path` and return it."""
    path = Path(path)
    path.write_text(yaml.safe_dump(inventory(hosts, group, extra_vars), sort_keys=False))
    return path


def boot_hosts(
    count: int,
    names: Sequence[str] | None = None,
    root: Root | None = None,
    detached: bool = False,
    timeout: float = BOOT_TIMEOUT,
) -> list[Host]:
    """Boot `count` hosts from the cached root and wait until SSH answers and systemd is up.

    Hosts are stopped at this process's exit unless `detached` (then whoever holds their
    records, e.g. a state file, must stop them).
    """
    if names is None:
        names = []
    elif len(names) != count or len(set(names)) != count:
        raise HostError(f"boot_hosts: need {count} distinct names, got {list(names)}")
    for name in names:
        if not _HOSTNAME.fullmatch(name):
            raise HostError(
                f"host name {name!r} is not a valid host name: use letters, digits and "
                "hyphens (no underscores), at most 63 characters"
            )
    root = root or ensure_root()
    if not detached:
        _install_exit_hooks()
    booted: list[Host] = []
    try:
        for index in range(count):
            booted.append(_spawn(names[index] if names else None, root, detached))
        _wait_ready(booted, timeout)
    except BaseException:
        stop_hosts(booted)
        raise
    return booted


def stop_hosts(hosts: Iterable[Host], grace: float = STOP_GRACE) -> None:
    """Stop every host, even when stopping one of them fails; raise the first failure after."""
    hosts = list(hosts)
    # SIGTERM all first, so that they power off in parallel rather than one by one.
    for host in hosts:
        if _alive(host.pid, host.pid_start):
            _signal(host.pid, signal.SIGTERM)
    failure: HostError | None = None
    for host in hosts:
        try:
            host._finish_stop(grace)
        except HostError as error:
            failure = failure or error
    if failure:
        raise failure


def running_hosts() -> list[Host]:
    """Every host recorded in the run folder whose processes are still alive."""
    found = []
    for record in sorted(run_dir().glob(f"{ADDRESS_PREFIX}*/host.json")):
        host = _load_record(record)
        if host is not None and host.pid and host.is_running():
            found.append(host)
    return found


def save_state(hosts: Iterable[Host], path: str | os.PathLike) -> Path:
    """Record hosts in a JSON state file so that another process can stop exactly them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps([host.to_record() for host in hosts], indent=2) + "\n")
    partial.rename(path)
    return path


def load_state(path: str | os.PathLike) -> list[Host]:
    """Hosts recorded by `save_state`; none when the file is missing."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        return [Host.from_record(record) for record in json.loads(path.read_text())]
    except (ValueError, TypeError) as error:
        raise HostError(f"{path}: not a test host state file ({error}); delete it") from error


# -- booting -----------------------------------------------------------------------------


def _spawn(name: str | None, root: Root, detached: bool) -> Host:
    address, folder = _claim_address(detached)
    name = name or f"testhost-{address.rsplit('.', 1)[1]}"
    listen = folder / "listen.conf"
    nspawn = [
        "systemd-nspawn", "-D", str(root.path), "--volatile=overlay", "--boot",
        "--register=no", "--keep-unit", f"--machine={name}", "--console=read-only",
        f"--bind-ro={listen}:/etc/ssh/sshd_config.d/listen.conf",
    ]  # fmt: skip
    try:
        listen.write_text(f"ListenAddress {address}\n")
        procs = _make_cgroups(address)
        with open(folder / "console.log", "wb") as log:
            # The shell moves itself into the host's own cgroups, then becomes systemd-nspawn.
            child = subprocess.Popen(
                ["/bin/sh", "-c", _ENTER_CGROUPS, "sh", *map(str, procs), "--", *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except BaseException:
        # Release the claim: nothing runs on this address.
        (folder / "host.json").unlink(missing_ok=True)
        raise
    _CHILDREN[child.pid] = child
    host = Host(
        name=name,
        address=address,
        pid=child.pid,
        pid_start=_start_time(child.pid),
        private_key=str(root.private_key),
        root=str(root.path),
        detached=detached,
    )
    if not detached:
        _LIVE[address] = host
    _write_record(host)
    return host


def _wait_ready(hosts: list[Host], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(hosts)
    # First the port: cheap to poll, and an ssh started before sshd listens only fails.
    while waiting:
        for host in list(waiting):
            if not _alive(host.pid, host.pid_start):
                raise HostError(_boot_failure(host, "systemd-nspawn exited during boot"))
            if _port_open(host.address):
                waiting.remove(host)
        if waiting:
            if time.monotonic() > deadline:
                raise HostError(
                    _boot_failure(waiting[0], f"sshd not listening after {timeout:.0f} s")
                )
            time.sleep(0.05)
    remaining = max(deadline - time.monotonic(), 5)
    probes = {
        host.address: subprocess.Popen(
            host.ssh_command("systemctl is-system-running --wait"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for host in hosts
    }
    try:
        for host in hosts:
            probe = probes[host.address]
            try:
                out, err = probe.communicate(timeout=max(deadline - time.monotonic(), remaining))
            except subprocess.TimeoutExpired:
                raise HostError(
                    _boot_failure(host, f"systemd not up after {timeout:.0f} s")
                ) from None
            state = out.strip()
            if state == "degraded":
                failed = host.ssh("systemctl --failed --no-legend --plain", timeout=15).stdout
                print(
                    f"testhosts: {host.name} ({host.address}) is degraded; failed units:\n"
                    f"{failed.strip()}",
                    file=sys.stderr,
                )
            elif state != "running":
                raise HostError(
                    _boot_failure(host, f"systemctl is-system-running said {state!r} {err.strip()}")
                )
    finally:
        for probe in probes.values():
            if probe.poll() is None:
                probe.kill()
                probe.wait()
    for host in hosts:
        host.init_pid, host.init_start = _container_init(host.pid)
        _write_record(host)


def _boot_failure(host: Host, what: str) -> str:
    return (
        f"test host {host.name} ({host.address}, PID {host.pid}): {what}; "
        f"console log {host.log_path}, last lines:\n{host.log_tail()}"
    )


def _port_open(address: str, port: int = 22) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((address, port)) == 0


def _port_free(address: str, port: int = 22) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As sshd binds: a connection of a stopped host left in TIME-WAIT on this address
        # must not hold it for a minute, while any listener still makes the bind fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


# -- cgroups ------------------------------------------------------------------------------

# Without a systemd on this machine to give each container a cgroup of its own, every host's
# systemd would share one cgroup tree: the same unit on two hosts then fights over one
# cgroup (seen as "status=219/CGROUP" failures when hosts start the same unit at once).
_ENTER_CGROUPS = """for procs do
    shift
    [ "$procs" = -- ] && break
    echo $$ > "$procs" || { echo "cannot enter cgroup $procs" >&2; exit 1; }
done
exec "$@"
"""


def _cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup trees systemd-nspawn takes its own cgroup from."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            tail = fields[fields.index("-") + 1 :]
            fstype, options = tail[0], tail[2].split(",")
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options):
                found.append(Path(fields[4]))
    return found


def _host_cgroups(address: str) -> list[Path]:
    return [tree / "fraisier-testhosts" / address for tree in _cgroup_hierarchies()]


def _make_cgroups(address: str) -> list[Path]:
    """Create the host's own (empty) cgroups; return their cgroup.procs files."""
    _remove_cgroups(address)
    procs = []
    for group in _host_cgroups(address):
        try:
            group.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HostError(
                f"cannot create cgroup {group} for test host {address}: {error}; "
                "test hosts need a writable cgroup file system (run as root, not in a "
                "container without cgroup delegation)"
            ) from error
        procs.append(group / "cgroup.procs")
    return procs


def _remove_cgroups(address: str) -> None:
    """Remove the host's cgroups, deepest first; only empty ones can go, others stay."""
    for group in _host_cgroups(address):
        if not group.is_dir():
            continue
        for folder, _subdirs, _files in os.walk(group, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


# -- address claims ----------------------------------------------------------------------


@contextlib.contextmanager
def _claims_lock() -> Iterator[None]:
    folder = run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "claims.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reap_dead_sessions() -> None:
    """Stop every host whose session died without stopping it (SIGKILL): nobody else will.

    All of them, not only those below the first free address: an orphan above it would
    otherwise live on for as long as lower addresses keep coming free.
    """
    for record in sorted(run_dir().glob(f"{ADDRESS_PREFIX}*/host.json")):
        held = _load_record(record)
        if held is not None and _held(held):
            continue
        if held is not None and held.pid:
            stop_hosts([held], grace=2)
        record.unlink(missing_ok=True)


def _claim_address(detached: bool) -> tuple[str, Path]:
    """Take the lowest 127.0.2.N no other session holds, reaping hosts of dead sessions."""
    with _claims_lock():
        _reap_dead_sessions()
        for octet in OCTETS:
            address = f"{ADDRESS_PREFIX}{octet}"
            folder = run_dir() / address
            record = folder / "host.json"
            # Under the same lock, every record left after the reaping is a held address.
            if record.exists() or not _port_free(address):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(
                record, {"address": address, "owner": os.getpid(), "pid": 0, "detached": detached}
            )
            return address, folder
    raise HostError(
        f"no free address left in {ADDRESS_PREFIX}1-254: see `python -m tests.hosts status` "
        "and stop leftovers with `python -m tests.hosts down --all`"
    )


def _held(host: Host) -> bool:
    if not host.pid:
        # Claimed and not spawned yet: held while the claiming process lives.
        return _alive(host.owner, "")
    if not host.is_running():
        return False
    return host.detached or _alive(host.owner, "")


def _load_record(path: Path) -> Host | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data.setdefault("name", data.get("address", "?"))
    data.setdefault("private_key", "")
    data.setdefault("root", "")
    data.setdefault("pid", 0)
    try:
        return Host.from_record(data)
    except TypeError:
        return None


def _write_record(host: Host) -> None:
    _write_json(host.dir / "host.json", host.to_record())


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.rename(path)


# -- processes ---------------------------------------------------------------------------


def _start_time(pid: int) -> str:
    """Start time of a process (field 22 of /proc/PID/stat): tells a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None, start: str) -> bool:
    """True if `pid` runs (not a zombie) and, when `start` is known, is the same process."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in {"Z", "X"}:
        return False
    return not start or fields[19] == start


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int | None, start: str, seconds: float) -> None:
    child = _CHILDREN.get(pid) if pid else None
    deadline = time.monotonic() + seconds
    while _alive(pid, start) and time.monotonic() < deadline:
        if child is not None:
            child.poll()
        time.sleep(0.05)


def _container_init(nspawn_pid: int) -> tuple[int | None, str]:
    """PID (in our namespace) of the container's PID 1, a direct child of systemd-nspawn."""
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None, ""
    for child in children:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and line.split()[-1] == "1":
                return int(child), _start_time(int(child))
    return None, ""


def _stop_live() -> None:
    hosts = list(_LIVE.values())
    if hosts:
        with contextlib.suppress(HostError):
            stop_hosts(hosts, grace=5)


def _interrupt(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C, so that fixture finalizers and `finally` blocks stop the hosts.
    raise KeyboardInterrupt(f"signal {signum}")


def _install_exit_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(_stop_live)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _interrupt)
