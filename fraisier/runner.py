"""The only importer of ansible_runner: one fresh private data dir per run, events handed off.

What this module guards against (each seen with ansible-core 2.19 / runner 2.4):
- a reused private data dir keeps the old `env/extravars`: every run gets a new one;
- the event handler runs inside runner's output loop, so it only hands events on;
- runner's own cancel SIGKILLs the process group, but ansible workers call setsid()
  and survive it: cancel is SIGTERM to the ansible-playbook PID, then a hard kill of
  every process of the run;
- the `starting` status and `artifacts/<id>/command` carry the whole environment:
  the environment given to runner is built from a short allow-list, and any value
  holding a secret is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets as _secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fraisier.errors import DeployError

# Environment variables a playbook run may inherit; everything else (tokens,
# webhook secrets, database URLs) stays in Fraisier's own process.
_ENV_ALLOW = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM")
_ENV_ALLOW_PREFIXES = ("LC_", "ANSIBLE_", "SSH_AUTH_SOCK")
CANCEL_GRACE_SECONDS = 10.0
KEEP_RUN_DIRS = 20


@dataclass(frozen=True)
class PlaybookRun:
    """Everything one ansible-playbook run needs; built by deploys.py."""

    name: str
    playbook: Path
    inventory: Mapping[str, Any]
    extravars: Mapping[str, Any]
    inventory_sources: tuple[str, ...] = ()
    roles_path: tuple[str, ...] = ()
    check: bool = False
    diff: bool = False
    limit: tuple[str, ...] = ()
    forks: int | None = None
    timeout: float | None = None
    vault_password_file: str | None = None
    verbosity: int = 0
    secrets: tuple[str, ...] = ()
    envvars: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RunOutcome:
    """How a run ended, as runner and Fraisier saw it."""

    status: str  # successful | failed | canceled | timeout
    rc: int | None
    host_stats: dict[str, dict[str, int]]
    artifact_data: dict[str, Any]
    playbook_pid: int | None
    private_data_dir: Path
    event_count: int


def load_ansible_runner() -> None:
    """Import ansible-runner ahead of the first run, e.g. while another process works."""
    import ansible_runner  # noqa: F401


def default_work_dir(environ: Mapping[str, str] | None = None) -> Path:
    """FRAISIER_WORK_DIR, else /var/lib/fraisier/work for root, else the XDG state dir."""
    env = os.environ if environ is None else environ
    if env.get("FRAISIER_WORK_DIR"):
        return Path(env["FRAISIER_WORK_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/fraisier/work")
    state = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fraisier" / "work"


def _runner_env(
    run: PlaybookRun, roles_path: str, control_dir: Path, local_temp: Path
) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k in _ENV_ALLOW or k.startswith(_ENV_ALLOW_PREFIXES)
    }
    # ansible-playbook of the interpreter running Fraisier, even when its
    # virtualenv is not activated.
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    if bin_dir not in path.split(":"):
        env["PATH"] = f"{bin_dir}:{path}"
    env.update(
        {
            "ANSIBLE_ROLES_PATH": roles_path,
            # One Python start per task per host is the main cost: pipelining halves it.
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_FORCE_COLOR": "False",
            "ANSIBLE_NOCOLOR": "True",
            # A private ControlPath dir lets the run's leftover ssh masters be found and stopped.
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
            "ANSIBLE_LOCAL_TEMP": str(local_temp),
        }
    )
    env.update(run.envvars)
    return scrub_env(env, run.secrets)


def scrub_env(env: Mapping[str, str], secret_values: Iterable[str]) -> dict[str, str]:
    """Drop every variable whose value contains a secret."""
    secrets = [s for s in secret_values if s]
    return {k: v for k, v in env.items() if not any(s in v for s in secrets)}


def _descendants(root_pids: Iterable[int]) -> set[int]:
    """PIDs below the given ones, found through /proc; workers that setsid() stay children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        fields = stat.rsplit(")", 1)[-1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    stack = list(root_pids)
    while stack:
        pid = stack.pop()
        for child in children.get(pid, ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def processes_mentioning(*texts: str) -> set[int]:
    """PIDs whose command line contains one of texts (the run's dirs mark its processes)."""
    found = set()
    needles = [text.encode() for text in texts]
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if any(needle in cmdline for needle in needles):
            found.add(int(name))
    return found


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def prune_run_dirs(runs_dir: Path, keep: int = KEEP_RUN_DIRS) -> None:
    """Keep the newest `keep` private data dirs; their artifacts help debugging."""
    if not runs_dir.is_dir():
        return
    dirs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
    for old in dirs[:-keep] if keep else dirs:
        shutil.rmtree(old, ignore_errors=True)


class PlaybookRunner:
    """Runs one playbook through ansible-runner; cancel() may be called from any thread."""

    def __init__(
        self,
        run: PlaybookRun,
        *,
        work_dir: Path,
        on_event: Callable[[dict[str, Any]], None],
        cancel_grace: float = CANCEL_GRACE_SECONDS,
    ):
        self.run_spec = run
        self.work_dir = Path(work_dir)
        self.on_event = on_event
        self.cancel_grace = cancel_grace
        self.playbook_pid: int | None = None
        self.host_stats: dict[str, dict[str, int]] = {}
        self.artifact_data: dict[str, Any] = {}
        self.event_count = 0
        self._cancel_reason: str | None = None
        self._cancel_started: float | None = None
        self._hard_killed = False
        self._term_sent = False
        self._lock = threading.Lock()
        self._finished = threading.Event()
        # ssh's ControlPath must stay under 108 bytes: a short private dir of its own,
        # whose name also marks the run's ssh masters so that they can be stopped.
        self.control_dir = Path(tempfile.mkdtemp(prefix="fraisier-cp-"))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.private_data_dir = (
            self.work_dir / "runs" / f"{stamp}-{run.name}-{_secrets.token_hex(4)}"
        )

    # -- events ---------------------------------------------------------------
    def _event_handler(self, event: dict[str, Any]) -> bool:
        # Runs inside runner's output loop: only cheap dict work and a queue hand-off.
        self.event_count += 1
        kind = event.get("event")
        if kind == "playbook_on_start":
            self.playbook_pid = event.get("pid") or self.playbook_pid
        elif kind == "playbook_on_stats":
            data = event.get("event_data") or {}
            self.artifact_data = dict(data.get("artifact_data") or {})
            self.host_stats = _host_stats(data)
        self.on_event(event)
        # The store keeps the event; runner need not write it to disk as well.
        return False

    # -- cancel ---------------------------------------------------------------
    def cancel(self, reason: str = "canceled") -> None:
        """Stop the run: SIGTERM to ansible-playbook now, a hard kill after the grace period."""
        with self._lock:
            if self._cancel_reason is not None or self._finished.is_set():
                return
            self._cancel_reason = reason
            self._cancel_started = time.monotonic()
            pid = self.playbook_pid
            self._term_sent = pid is not None
        if pid:
            _kill([pid], signal.SIGTERM)

    def _cancel_callback(self) -> bool:
        # Polled by runner's output loop; returning True makes runner stop reading.
        if self._cancel_reason is None:
            return False
        pid = self.playbook_pid
        if pid and not self._term_sent:
            # cancel() came before playbook_on_start told us the PID.
            self._term_sent = True
            self._cancel_started = time.monotonic()
            _kill([pid], signal.SIGTERM)
            return False
        started = self._cancel_started or time.monotonic()
        if pid and _alive(pid) and time.monotonic() - started < self.cancel_grace:
            return False
        self._hard_kill()
        return True

    def _hard_kill(self) -> None:
        if self._hard_killed:
            return
        self._hard_killed = True
        roots = [self.playbook_pid] if self.playbook_pid else []
        pids = _descendants(roots) | set(roots) | self._marked_processes()
        _kill(pids, signal.SIGKILL)

    def _marked_processes(self) -> set[int]:
        return processes_mentioning(str(self.private_data_dir), str(self.control_dir))

    def _reap_leftovers(self) -> None:
        """Stop what outlives ansible-playbook: ssh control masters, stray workers."""
        pids = self._marked_processes()
        # Once ansible-playbook is gone its children have new parents and only their
        # command lines still tie them to this run.
        if self.playbook_pid and _alive(self.playbook_pid):
            pids |= _descendants([self.playbook_pid])
        if not pids:
            return
        _kill(pids, signal.SIGTERM)
        # An ssh master exits within a few ms of SIGTERM; every deployment waits for this.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.005)
        _kill([p for p in pids if _alive(p)], signal.SIGKILL)

    def leftover_processes(self) -> set[int]:
        """Processes of this run still alive (tests count them after a cancel)."""
        return {p for p in self._marked_processes() if _alive(p)}

    # -- run ------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        pdd = self.private_data_dir
        for sub in ("inventory", "env", "project", "tmp"):
            (pdd / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(pdd, 0o700)
        (pdd / "inventory" / "fraisier.json").write_text(json.dumps(self.run_spec.inventory))
        # JSON keeps {"__ansible_unsafe": ...} markers intact for Ansible's loader.
        (pdd / "env" / "extravars").write_text(json.dumps(self.run_spec.extravars))

    def _cmdline(self) -> str:
        import shlex

        run = self.run_spec
        args: list[str] = []
        for source in run.inventory_sources:
            args += ["-i", source]
        if run.check:
            args.append("--check")
        if run.diff:
            args.append("--diff")
        if run.vault_password_file:
            args += ["--vault-password-file", run.vault_password_file]
        return shlex.join(args)

    def run(self) -> RunOutcome:
        """Run the playbook to the end (or cancel/timeout) and say how it ended."""
        import ptyprocess
        from ansible_runner import Runner
        from ansible_runner.config.runner import RunnerConfig

        # ansible-runner closes the pty of ansible-playbook after it has exited, and
        # PtyProcess.close() then sleeps delayafterclose (0.1 s, set per instance in
        # __init__, out of our reach) for a status already final: a tenth of a second of
        # every deployment. A class-level property wins over that instance attribute. A
        # child still alive at close (a cancel) is terminated by close() all the same.
        if not isinstance(vars(ptyprocess.PtyProcess).get("delayafterclose"), property):
            ptyprocess.PtyProcess.delayafterclose = property(
                lambda _self: 0.0, lambda _self, _value: None
            )

        run = self.run_spec
        # Keep the artifacts of recent runs for debugging, not of every run ever made.
        prune_run_dirs(self.work_dir / "runs", KEEP_RUN_DIRS - 1)
        self._prepare_dir()
        from fraisier.resources import builtin_dir

        roles_path = ":".join([*run.roles_path, str(builtin_dir("roles"))])
        timer: threading.Timer | None = None
        if run.timeout:
            timer = threading.Timer(run.timeout, self.cancel, kwargs={"reason": "timeout"})
            timer.daemon = True
            timer.start()
        try:
            rc = RunnerConfig(
                private_data_dir=str(self.private_data_dir),
                playbook=str(run.playbook),
                inventory=str(self.private_data_dir / "inventory"),
                limit=",".join(run.limit) or None,
                forks=run.forks,
                verbosity=run.verbosity or None,
                cmdline=self._cmdline() or None,
                quiet=True,
                suppress_env_files=True,
                rotate_artifacts=1,
                ident="run",
            )
            rc.prepare()
            # prepare() seeds the environment from os.environ: replace it whole.
            rc.env = _runner_env(
                run, roles_path, self.control_dir, self.private_data_dir / "tmp"
            ) | {
                k: v
                for k, v in rc.env.items()
                if k.startswith(("ANSIBLE_CALLBACK", "ANSIBLE_STDOUT_CALLBACK", "AWX_"))
                or k in ("RUNNER_OMIT_EVENTS", "RUNNER_ONLY_FAILED_EVENTS", "PYTHONPATH")
            }
            runner = Runner(
                config=rc,
                event_handler=self._event_handler,
                cancel_callback=self._cancel_callback,
            )
            status, code = runner.run()
        except DeployError:
            raise
        except Exception as exc:  # runner raises bare exceptions for bad settings
            raise DeployError(
                f"ansible-runner could not run {run.playbook}: {exc} (private data dir"
                f" {self.private_data_dir})"
            ) from exc
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._finished.set()
            self._reap_leftovers()
            shutil.rmtree(self.control_dir, ignore_errors=True)
        if self._cancel_reason is not None:
            status = self._cancel_reason
        elif status not in ("successful", "failed", "canceled", "timeout"):
            status = "failed"
        return RunOutcome(
            status=status,
            rc=code,
            host_stats=self.host_stats,
            artifact_data=self.artifact_data,
            playbook_pid=self.playbook_pid,
            private_data_dir=self.private_data_dir,
            event_count=self.event_count,
        )


def _host_stats(event_data: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per-host counters from a playbook_on_stats event."""
    keys = ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored", "processed")
    hosts: set[str] = set()
    for key in keys:
        hosts.update((event_data.get(key) or {}).keys())
    out = {}
    for host in sorted(hosts):
        row = {key: int((event_data.get(key) or {}).get(host, 0)) for key in keys}
        row["unreachable"] = row.pop("dark")
        row.pop("processed")
        out[host] = row
    return out
