"""The use cases: deploy, roll back, cancel, recover after a crash.

One deployment runs under the lock of its fraise+environment, held in the store
with a lease that a heartbeat renews, so a crashed holder's lock expires and a
CLI deploy and a webhook deploy of the same pair never run at once.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fraisier.errors import ConfigError, DeployError, FraisierError, LockedError, NotFoundError
from fraisier.inventory import DeploymentRequest, build_extravars, build_inventory, role_vars

LOCK_LEASE_SECONDS = 60.0
HEARTBEAT_SECONDS = 15.0
CANCEL_POLL_SECONDS = 1.0
WAIT_POLL_SECONDS = 1.0
KEEP_ARCHIVES = 10
FAILED_EVENTS = ("runner_on_failed", "runner_on_unreachable", "runner_item_on_failed")


_RELEASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_release_id(value: str, *, where: str = "release") -> str:
    """Refuse a release id that could be a path or an option on a host."""
    if not _RELEASE_ID_RE.fullmatch(value or ""):
        raise DeployError(
            f"{where}: {value!r} is not a release id (letters, digits, '.', '_', '-';"
            " see `fraisier history` or the host's releases/ folder)"
        )
    return value


def recover(store) -> list[int]:
    """Mark deployments left `running` by a dead process as interrupted and free their locks."""
    from fraisier.store import local_process_alive

    return store.mark_interrupted(local_process_alive)


@dataclass
class DeployResult:
    """What a deploy, rollback or skipped deploy came to."""

    deployment_id: int | None
    status: str
    fraise: str
    environment: str
    commit: str | None = None
    release_id: str | None = None
    dry_run: bool = False
    error: str | None = None
    skipped: bool = False
    host_stats: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the deployment succeeded or had nothing to do."""
        return self.skipped or self.status == "successful"

    def to_dict(self) -> dict[str, Any]:
        """JSON shape of `fraisier deploy --json`."""
        return {
            "deployment_id": self.deployment_id,
            "fraise": self.fraise,
            "environment": self.environment,
            "status": self.status,
            "commit": self.commit,
            "release_id": self.release_id,
            "dry_run": self.dry_run,
            "skipped": self.skipped,
            "error": self.error,
            "hosts": self.host_stats,
        }


def _work_dir(work_dir: Path | None) -> Path:
    from fraisier.runner import default_work_dir

    return Path(work_dir) if work_dir else default_work_dir()


def _prune_archives(archive_dir: Path, keep: int = KEEP_ARCHIVES) -> None:
    files = sorted(archive_dir.glob("*.tar.gz"), key=lambda p: p.stat().st_mtime)
    for old in files[:-keep]:
        old.unlink(missing_ok=True)


def _first_failure(event: Mapping[str, Any]) -> str | None:
    data = event.get("event_data") or {}
    if data.get("ignore_errors"):
        return None
    res = data.get("res") or {}
    msg = res.get("msg") or res.get("stderr") or res.get("reason") or ""
    if isinstance(msg, (list, dict)):
        msg = str(msg)
    msg = " ".join(str(msg).split())[:400]
    host = data.get("host") or "?"
    task = data.get("task") or data.get("task_action") or "?"
    kind = "unreachable" if event.get("event") == "runner_on_unreachable" else "failed"
    return f"{host}: task '{task}' {kind}: {msg}" if msg else f"{host}: task '{task}' {kind}"


def _rollback_outcome(artifact_data: Mapping[str, Any]) -> tuple[str, str] | None:
    """(status, error) from the `fraisier_rollback` stats the api role records, if any."""
    info = artifact_data.get("fraisier_rollback") or {}
    if not isinstance(info, Mapping) or not info:
        return None
    statuses = {host: (v or {}).get("status") for host, v in info.items()}
    errors = [f"{host}: {(v or {}).get('error')}" for host, v in sorted(info.items())]
    status = "rollback_failed" if "rollback_failed" in statuses.values() else "rolled_back"
    return status, "; ".join(errors)


class Deployment:
    """One deployment of a fraise+environment, from source to recorded result."""

    def __init__(
        self,
        config,
        fraise: str,
        environment: str,
        *,
        store,
        commit: str | None = None,
        branch: str | None = None,
        dry_run: bool = False,
        force: bool = False,
        wait: bool = False,
        wait_timeout: float | None = None,
        limit: Sequence[str] = (),
        trigger: str = "cli",
        requested_by: str | None = None,
        commit_message: str | None = None,
        deployment_id: int | None = None,
        rollback_to: str | None = None,
        action: str | None = None,
        verbosity: int = 0,
        work_dir: Path | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_progress: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.fraise = config.fraise(fraise)
        self.env = config.environment(fraise, environment)
        self.store = store
        self.commit = commit
        self.branch = branch
        self.dry_run = dry_run
        self.force = force
        self.wait = wait
        self.wait_timeout = wait_timeout
        self.limit = tuple(limit)
        self.trigger = trigger
        self.requested_by = requested_by
        self.commit_message = commit_message
        self.deployment_id = deployment_id
        self.rollback_to = rollback_to
        self.action = action
        self.verbosity = verbosity
        self.work_dir = _work_dir(work_dir)
        self.on_event = on_event
        self.on_progress = on_progress or (lambda _msg: None)
        from fraisier.store import owner_id

        # Unique per deployment: two deployments in one process (webhook workers) must
        # not share, and so re-enter, one lock.
        self.owner = owner_id()
        self.holder = f"{self.owner}#{secrets.token_hex(3)}"
        self._runner = None
        self._cancel_reason: str | None = None
        self._cancel_message: str | None = None
        self._first_error: str | None = None
        self._stop_heartbeat = threading.Event()

    # -- checks before anything is written -------------------------------------
    def validate(self) -> None:
        """Every check that needs neither the store nor the network; nothing is written."""
        from fraisier.source import validate_branch, validate_sha

        self.config.require_resolved(self.fraise.name, self.env.key)
        if not (self.env.hosts or self.env.inventory_group or self.env.name):
            raise ConfigError(
                f"fraises.{self.fraise.name}.environments.{self.env.key}: no host to deploy to;"
                " set `hosts`, `inventory_group` or `name`"
            )
        if self.commit is not None:
            validate_sha(self.commit, where="--commit")
        if self.branch is not None:
            validate_branch(self.branch, where="branch")
        if self.limit:
            known = set(self.env.hosts or ())
            unknown = [h for h in self.limit if known and h not in known]
            if unknown:
                raise NotFoundError(
                    f"--limit names host(s) {', '.join(unknown)} not in"
                    f" fraises.{self.fraise.name}.environments.{self.env.key}.hosts"
                    f" (known: {', '.join(sorted(known))})"
                )
        if not self.env.app_path and self.action != "rollback":
            raise ConfigError(
                f"fraises.{self.fraise.name}.environments.{self.env.key}.app_path is not set:"
                " Fraisier needs the folder that holds releases/ and current"
            )
        if self.action != "rollback" and not (self.commit or self.branch or self.env.branch):
            raise ConfigError(
                f"fraises.{self.fraise.name}.environments.{self.env.key}.branch is not set:"
                " set the branch this environment deploys, or pass --commit SHA"
            )
        if not self.env.repository and self.action != "rollback":
            raise ConfigError(
                f"fraises.{self.fraise.name}.environments.{self.env.key}.repository is not set"
                f" (nor fraises.{self.fraise.name}.repository): Fraisier needs the clone URL"
                " to build the release"
            )
        # Job units and the like are checked here, before a deployment row exists.
        role_vars(self.fraise, self.env)
        if self.env.playbook is None:
            from fraisier.resources import builtin_playbook

            builtin_playbook(self.action or self.fraise.type)

    def _playbook(self) -> Path:
        from fraisier.resources import builtin_playbook

        if self.action == "rollback":
            return builtin_playbook("rollback")
        if self.env.playbook is not None:
            playbook = Path(self.env.playbook)
            if not playbook.is_file():
                raise ConfigError(
                    f"fraises.{self.fraise.name}.environments.{self.env.key}.playbook:"
                    f" {playbook} does not exist"
                )
            return playbook
        return builtin_playbook(self.fraise.type)

    # -- source ------------------------------------------------------------------
    def _mirror(self):
        from fraisier.source import Mirror

        key = getattr(self.config.ansible, "private_key_file", None)
        return Mirror(self.env.repository, self.work_dir / "mirrors", ssh_key=key)

    def _resolve_source(self) -> tuple[Any, str, dict]:
        from fraisier.runner import load_ansible_runner

        mirror = self._mirror()
        self.on_progress(f"fetching {self.env.repository}")
        # ansible-runner is imported while git fetches, which would otherwise be waited for.
        mirror.fetch(meanwhile=load_ansible_runner)
        branch = self.branch or self.env.branch
        if self.commit:
            sha = mirror.resolve(commit=self.commit)
            return mirror, sha, mirror.commit_info(sha)
        info = mirror.head_info(branch)
        return mirror, info["sha"], info

    # -- locking -------------------------------------------------------------------
    def _acquire_lock(self, deployment_id: int) -> None:
        deadline = None if self.wait_timeout is None else time.monotonic() + self.wait_timeout
        announced = False
        while True:
            try:
                self.store.acquire_lock(
                    self.fraise.name,
                    self.env.key,
                    holder=self.holder,
                    deployment_id=deployment_id,
                    lease_seconds=LOCK_LEASE_SECONDS,
                )
                return
            except LockedError as exc:
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    raise
                if not announced:
                    self.on_progress(f"waiting: {exc.message}")
                    announced = True
                if self._cancel_reason:
                    raise
                time.sleep(WAIT_POLL_SECONDS)

    def _heartbeat(self, deployment_id: int) -> None:
        last_beat = time.monotonic()
        while not self._stop_heartbeat.wait(CANCEL_POLL_SECONDS):
            try:
                if self.store.cancel_requested(deployment_id):
                    self.cancel("canceled by `fraisier cancel`")
            except Exception:  # the next poll asks again
                pass
            if time.monotonic() - last_beat < HEARTBEAT_SECONDS:
                continue
            last_beat = time.monotonic()
            try:
                self.store.renew_lock(
                    self.fraise.name,
                    self.env.key,
                    holder=self.holder,
                    lease_seconds=LOCK_LEASE_SECONDS,
                )
                self.store.update_deployment(deployment_id, heartbeat_at=_now())
            except Exception:  # a missed beat only shortens the lease
                continue

    # -- cancel --------------------------------------------------------------------
    def cancel(self, reason: str = "canceled", *, status: str = "canceled") -> None:
        """Stop this deployment from any thread; `reason` is recorded as its error."""
        if self._cancel_reason is not None:
            return
        self._cancel_reason = status
        self._cancel_message = reason
        if self._runner is not None:
            self._runner.cancel(status)

    # -- the run ---------------------------------------------------------------------
    def _handle_event(self, writer, event: dict[str, Any]) -> None:
        # Runs inside ansible-runner's output loop: hand-offs only.
        writer.put(event)
        if self._first_error is None and event.get("event") in FAILED_EVENTS:
            self._first_error = _first_failure(event)
        if self.on_event is not None:
            self.on_event(event)

    def run(self) -> DeployResult:
        """Validate, fetch, lock, run the playbook, record the result."""
        from fraisier.runner import PlaybookRun, PlaybookRunner
        from fraisier.source import make_release_id

        self.validate()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        recover(self.store)
        mirror = sha = info = None
        if self.action != "rollback":
            mirror, sha, info = self._resolve_source()
            live = self.store.last_successful(self.fraise.name, self.env.key)
            if (
                live
                and live.get("commit") == sha
                and not self.force
                and not self.dry_run
                and self.deployment_id is None
            ):
                return DeployResult(
                    deployment_id=live.get("id") or live.get("deployment_id"),
                    status="successful",
                    fraise=self.fraise.name,
                    environment=self.env.key,
                    commit=sha,
                    skipped=True,
                    error=None,
                )
        else:
            sha = self.commit

        deployment_id = self.deployment_id
        if deployment_id is None:
            deployment_id = self.store.create_deployment(
                fraise=self.fraise.name,
                environment=self.env.key,
                trigger=self.trigger,
                commit=sha,
                branch=self.branch or self.env.branch,
                dry_run=self.dry_run,
                requested_by=self.requested_by,
                commit_message=(info or {}).get("message") or self.commit_message,
                # Owned from the start, so that a webhook worker never claims it as queued.
                owner=self.owner,
                options={
                    "force": self.force,
                    "limit": list(self.limit),
                    "rollback_to": self.rollback_to,
                },
            )
        self.deployment_id = deployment_id
        try:
            self._acquire_lock(deployment_id)
        except LockedError as exc:
            self.store.transition(deployment_id, "canceled", error=f"not started: {exc.message}")
            raise
        heartbeat = threading.Thread(target=self._heartbeat, args=(deployment_id,), daemon=True)
        try:
            release_id = self.rollback_to
            archive_path = ""
            if self.action != "rollback":
                release_id = make_release_id(sha)
            self._start(deployment_id, commit=sha, release_id=release_id)
            heartbeat.start()
            if self._cancel_reason:
                return self._finish(
                    deployment_id, self._cancel_reason, f"{self._cancel_message} (before start)"
                )
            if mirror is not None:
                archive_dir = self.work_dir / "releases"
                archive = mirror.archive(sha, archive_dir, release_id)
                archive_path = str(archive.path)
                _prune_archives(archive_dir)
            request = DeploymentRequest(
                deployment_id=deployment_id,
                fraise=self.fraise.name,
                environment=self.env.key,
                commit=sha or "",
                release_id=release_id or "",
                archive_path=archive_path,
                branch=self.branch or self.env.branch,
                commit_message=(info or {}).get("message") or self.commit_message,
                author=(info or {}).get("author"),
                trigger=self.trigger,
                requested_by=self.requested_by,
                rollback_to=self.rollback_to,
            )
            ansible = self.config.ansible
            run = PlaybookRun(
                name=f"{deployment_id}",
                playbook=self._playbook(),
                inventory=build_inventory(self.config, self.env),
                extravars=build_extravars(self.fraise, self.env, request),
                inventory_sources=tuple(str(p) for p in [ansible.inventory] if p),
                roles_path=tuple(str(p) for p in (ansible.roles_path or ())),
                check=self.dry_run,
                diff=self.dry_run,
                limit=self.limit,
                # Ansible's default of 5 forks would deploy a larger fleet in waves.
                forks=ansible.forks or min(max(len(self.env.hosts or ()), 5), 50),
                timeout=self.env.timeout,
                vault_password_file=(
                    str(ansible.vault_password_file) if ansible.vault_password_file else None
                ),
                verbosity=self.verbosity,
                secrets=tuple(self.config.secret_values()),
            )
            with self.store.event_writer(deployment_id, redact=_redactor(run.secrets)) as writer:
                self._runner = PlaybookRunner(
                    run,
                    work_dir=self.work_dir,
                    on_event=lambda ev: self._handle_event(writer, ev),
                )
                if self._cancel_reason:
                    self._runner.cancel(self._cancel_reason)
                outcome = self._runner.run()
            self.store.record_host_results(deployment_id, outcome.host_stats)
            status, error = self._map_outcome(outcome)
            if self.action == "rollback" and status == "successful":
                release_id, sha = self._live_release(outcome, deployment_id, release_id, sha)
            return self._finish(deployment_id, status, error, outcome.host_stats, release_id, sha)
        except BaseException as exc:
            # Whatever stopped us, the row must not stay `running`.
            message = exc.message if hasattr(exc, "message") else f"{type(exc).__name__}: {exc}"
            status = "canceled" if isinstance(exc, KeyboardInterrupt) else "failed"
            self._finish(deployment_id, status, message)
            raise
        finally:
            self._stop_heartbeat.set()
            self.store.release_lock(self.fraise.name, self.env.key, holder=self.holder)

    def _live_release(self, outcome, deployment_id: int, release_id, sha):
        """The release the hosts switched back to, and its commit, recorded on the row."""
        live = outcome.artifact_data.get("fraisier_live") or {}
        releases = {str(r) for r in live.values() if r} if isinstance(live, Mapping) else set()
        if len(releases) != 1:
            return release_id, sha
        release_id = releases.pop()
        if sha is None:
            known = self.store.deployment_by_release(self.fraise.name, self.env.key, release_id)
            sha = known.get("commit") if known else None
        fields = {"release_id": release_id}
        if sha:
            fields["commit"] = sha
        self.store.update_deployment(deployment_id, **fields)
        return release_id, sha

    def _start(self, deployment_id: int, **fields: Any) -> None:
        """queued -> running; a row a worker claimed is running already under our owner."""
        row = self.store.deployment(deployment_id) or {}
        fields = {k: v for k, v in fields.items() if v is not None}
        if row.get("status") == "running" and row.get("owner") == self.owner:
            self.store.update_deployment(deployment_id, heartbeat_at=_now(), **fields)
        else:
            self.store.transition(
                deployment_id, "running", owner=self.owner, heartbeat_at=_now(), **fields
            )

    def _map_outcome(self, outcome) -> tuple[str, str | None]:
        if outcome.status in ("canceled", "timeout"):
            if outcome.status == "timeout":
                what = f"timed out after {self.env.timeout} s (timeout of the environment)"
            else:
                what = self._cancel_message or "canceled"
            return outcome.status, what + (f"; {self._first_error}" if self._first_error else "")
        rollback = _rollback_outcome(outcome.artifact_data)
        if rollback is not None and not self.dry_run:
            return rollback
        if outcome.status == "successful":
            return "successful", None
        unreachable = [h for h, s in outcome.host_stats.items() if s.get("unreachable")]
        if self._first_error:
            return "failed", self._first_error
        if unreachable:
            return "failed", f"unreachable: {', '.join(unreachable)}"
        return "failed", f"ansible-playbook exited with {outcome.rc}; see fraisier logs"

    def _finish(
        self,
        deployment_id: int,
        status: str,
        error: str | None,
        host_stats: dict | None = None,
        release_id: str | None = None,
        commit: str | None = None,
    ) -> DeployResult:
        self.store.transition(deployment_id, status, error=error)
        return DeployResult(
            deployment_id=deployment_id,
            status=status,
            fraise=self.fraise.name,
            environment=self.env.key,
            commit=commit,
            release_id=release_id,
            dry_run=self.dry_run,
            error=error,
            host_stats=host_stats or {},
        )


def _redactor(secret_values: Sequence[str]) -> Callable[[str], str]:
    values = sorted({s for s in secret_values if s and len(s) >= 4}, key=len, reverse=True)

    def redact(text: str) -> str:
        for value in values:
            if value in text:
                text = text.replace(value, "***")
        return text

    return redact


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


def rollback(
    config, fraise: str, environment: str, *, store, to: str | None = None, **kwargs
) -> Deployment:
    """A deployment that switches `current` back to an earlier release and checks its health."""
    target_commit = None
    if to is not None:
        # The commit is known when the release was deployed by Fraisier; without --to the
        # hosts pick their previous good release and report it (see _live_release).
        target = store.deployment_by_release(fraise, environment, to)
        target_commit = target.get("commit") if target else None
    return Deployment(
        config,
        fraise,
        environment,
        store=store,
        commit=target_commit,
        trigger="rollback",
        rollback_to=to,
        action="rollback",
        force=True,
        **kwargs,
    )


def cancel(store, deployment_id: int, *, wait_seconds: float = 60.0) -> str:
    """Cancel a queued deployment, or ask the process running one to stop; return its status."""
    from fraisier.store import TERMINAL_STATUSES

    row = store.deployment(deployment_id)
    if row is None:
        raise NotFoundError(f"no deployment {deployment_id} in the store")
    if row["status"] in TERMINAL_STATUSES:
        raise DeployError(
            f"deployment {deployment_id} already ended ({row['status']}); nothing to cancel"
        )
    if row["status"] == "queued":
        try:
            store.transition(deployment_id, "canceled", error="canceled while queued")
            return "canceled"
        except FraisierError:
            row = store.deployment(deployment_id) or row  # claimed meanwhile: cancel the run
    # The running process polls this flag about once a second, wherever it runs.
    store.request_cancel(deployment_id)
    recover(store)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        status = (store.deployment(deployment_id) or {}).get("status")
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(0.2)
    raise DeployError(
        f"deployment {deployment_id} did not stop within {wait_seconds:.0f} s; its owner"
        f" ({row.get('owner') or 'unknown'}) was asked to cancel and will hard-kill the run"
    )
