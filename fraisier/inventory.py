"""Pure translation: config + one deployment request -> Ansible inventory and extra vars.

Nothing here reads files, the environment or the network, so every rule is
tested without Ansible. Strings from fraises.yaml are trusted (they may use
Jinja, e.g. a per-host health URL); every string that comes from outside it
(webhook, commit, CLI argument) is wrapped as `{"__ansible_unsafe": ...}`,
because ansible-core templates plain extra vars: a commit message holding
`{{ lookup('pipe', ...) }}` would otherwise run on the controller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fraisier.errors import ConfigError

TARGET_GROUP = "fraisier_targets"
UNSAFE_KEY = "__ansible_unsafe"
_UNIT_NAME_RE = re.compile(r"[A-Za-z0-9:_.@-]+")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# user@host:path or host:path over ssh: no spaces, no leading '-' that rsync would take
# as an option, no 'host::module' that would mean an rsync daemon.
_REMOTE_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*:[^\s:][^\s]*")


@dataclass(frozen=True)
class DeploymentRequest:
    """One deployment to translate; every str here may come from outside the config."""

    deployment_id: int
    fraise: str
    environment: str
    commit: str
    release_id: str
    archive_path: str
    branch: str | None = None
    commit_message: str | None = None
    author: str | None = None
    trigger: str = "cli"
    requested_by: str | None = None
    rollback_to: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def unsafe(value: Any) -> Any:
    """Wrap every string inside value so Ansible never templates it."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return {UNSAFE_KEY: value}
    if isinstance(value, Mapping):
        if set(value) == {UNSAFE_KEY}:
            return dict(value)
        return {str(k): unsafe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unsafe(v) for v in value]
    return {UNSAFE_KEY: str(value)}


def _plain(value: Any) -> Any:
    """Turn config models and tuples into plain JSON-able values."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump(exclude_none=True))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


def connection_vars(config) -> dict[str, Any]:
    """Group vars for every host: connection settings from `ansible:`, then `ansible.vars`."""
    ansible = config.ansible
    out: dict[str, Any] = {}
    if getattr(ansible, "private_key_file", None):
        out["ansible_ssh_private_key_file"] = str(ansible.private_key_file)
    if getattr(ansible, "remote_user", None):
        out["ansible_user"] = ansible.remote_user
    if getattr(ansible, "become", None) is not None:
        out["ansible_become"] = bool(ansible.become)
    # Explicit vars win over the shorthand keys above.
    out.update(_plain(getattr(ansible, "vars", None) or {}))
    return out


def _host_entry(name: str, host_vars: Mapping[str, Any] | None) -> dict[str, Any]:
    entry = dict(_plain(host_vars or {}))
    if name in ("localhost", "127.0.0.1") and "ansible_connection" not in entry:
        entry["ansible_connection"] = "local"
        entry.setdefault("ansible_python_interpreter", "{{ ansible_playbook_python }}")
    return entry


def build_inventory(config, env) -> dict[str, Any]:
    """YAML-inventory dict whose group `fraisier_targets` holds the environment's hosts."""
    group: dict[str, Any]
    if env.hosts:
        group = {"hosts": {name: _host_entry(name, hv) for name, hv in env.hosts.items()}}
    elif env.inventory_group:
        # The user's inventory (passed beside this one) defines the group;
        # nesting it makes its hosts ours without copying them.
        group = {"children": {env.inventory_group: {}}}
    else:
        group = {"hosts": {env.name: _host_entry(env.name, None)}}
    return {"all": {"vars": connection_vars(config), "children": {TARGET_GROUP: group}}}


def _health_check(env) -> dict[str, Any] | None:
    check = _plain(env.health_check)
    if not check or not check.get("url"):
        return None
    if "from_" in check:
        check["from"] = check.pop("from_")
    return check


def role_vars(fraise, env) -> dict[str, Any]:
    """Role variables taken from trusted config keys for the fraise's type."""
    out: dict[str, Any] = {
        "fraise_release_app_path": env.app_path,
        "fraise_release_keep": env.keep_releases,
        "fraise_release_shared_paths": list(env.shared_paths or ()),
    }
    if fraise.type == "api":
        database = _plain(env.database) or None
        out.update(
            {
                "fraise_api_systemd_service": env.systemd_service,
                "fraise_api_build_command": env.build_command,
                "fraise_api_health_check": _health_check(env),
                "fraise_api_service": _plain(env.service) or None,
            }
        )
        if database:
            out["fraise_api_database"] = {
                k: v for k, v in database.items() if k in ("name", "strategy")
            }
            for key in ("migrate_command", "allow_rebuild", "compile_command"):
                if database.get(key) is not None:
                    out[f"fraise_api_{key}"] = database[key]
    elif fraise.type == "etl":
        where = f"fraises.{fraise.name}.environments.{env.key}"
        if not env.script_path:
            raise ConfigError(
                f"{where}.script_path is not set: an etl fraise runs that script (relative to"
                " the release) once per deployment"
            )
        _check_relative(env.script_path, f"{where}.script_path")
        out.update(
            {
                "fraise_etl_script_path": env.script_path,
                "fraise_etl_run_on": env.run_on,
                "fraise_etl_timeout": env.timeout,
                "fraise_etl_environment": _job_environment(env, where),
                "fraise_etl_database": env.database.name if env.database else None,
            }
        )
    elif fraise.type in ("scheduled", "backup"):
        where = f"fraises.{fraise.name}.environments.{env.key}"
        out[f"fraise_{fraise.type}_jobs"] = job_units(fraise, env)
        out[f"fraise_{fraise.type}_environment"] = _job_environment(env, where)
    return {k: v for k, v in out.items() if v is not None}


def _check_relative(path: str, where: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or ".." in parts or not path.strip():
        raise ConfigError(f"{where}: {path!r} must be a path inside the release, without '..'")


def _job_environment(env, where: str) -> dict[str, str]:
    """The `vars.env` mapping: environment variables of the scripts and jobs."""
    variables = (env.vars or {}).get("env") or {}
    if not isinstance(variables, Mapping):
        raise ConfigError(f"{where}.vars.env must be a mapping of variable names to values")
    out = {}
    for name, value in variables.items():
        if not _ENV_NAME_RE.fullmatch(str(name)):
            raise ConfigError(f"{where}.vars.env: {name!r} is not an environment variable name")
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else value
        if "\n" in str(text):
            raise ConfigError(f"{where}.vars.env.{name}: the value spans several lines")
        out[str(name)] = str(text)
    return out


def job_units(fraise, env) -> list[dict[str, Any]]:
    """The jobs of a scheduled or backup environment as the roles install them.

    Unit names are settled here, and each schedule is already turned into its
    OnCalendar= lines, so that the roles only write and check what they are given.
    """
    from fraisier.oncalendar import to_oncalendar

    where = f"fraises.{fraise.name}.environments.{env.key}.jobs"
    services = {
        name: job.systemd_service or f"{fraise.name}-{name}.service"
        for name, job in env.jobs.items()
    }
    jobs, seen = [], {}
    for name, job in env.jobs.items():
        jwhere = f"{where}.{name}"
        service = services[name]
        timer = job.systemd_timer or f"{service.rsplit('.', 1)[0]}.timer"
        units = ((service, ".service", "systemd_service"), (timer, ".timer", "systemd_timer"))
        for unit, suffix, key in units:
            if not _UNIT_NAME_RE.fullmatch(unit) or not unit.endswith(suffix) or len(unit) > 255:
                raise ConfigError(
                    f"{jwhere}: {unit!r} is not a valid systemd {suffix[1:]} unit name (from"
                    f" {key if getattr(job, key) else 'the fraise and job names'}): use letters,"
                    f" digits, ':', '_', '.', '-', at most 255 characters, ending in {suffix}"
                )
            if unit in seen:
                raise ConfigError(f"{jwhere}: unit {unit} is already used by job {seen[unit]}")
            seen[unit] = name
        if not (job.script_path or job.command or job.systemd_service):
            raise ConfigError(
                f"{jwhere}: give script_path or command (or a systemd_service the release"
                " ships or the host has) so that the job has something to run"
            )
        if job.script_path:
            _check_relative(job.script_path, f"{jwhere}.script_path")
        entry: dict[str, Any] = {
            "name": name,
            "service": service,
            "timer": timer,
            "schedule": job.schedule,
            "on_calendar": list(to_oncalendar(job.cron)),
            "description": job.description,
            "script_path": job.script_path,
            "command": job.command,
            "user": job.user,
            "persistent": job.persistent,
            "randomized_delay": job.randomized_delay,
            "enabled": job.enabled,
            "requires": [services[other] for other in job.depends_on],
        }
        if fraise.type == "backup":
            if job.remote is not None and not _REMOTE_RE.fullmatch(job.remote):
                raise ConfigError(
                    f"{jwhere}.remote: {job.remote!r} is not an rsync destination such as"
                    " backup@host:/srv/backups"
                )
            if (job.retention_days or job.remote) and not job.backup_dir:
                raise ConfigError(
                    f"{jwhere}: retention_days and remote work on backup_dir, which is not set"
                )
            entry.update(
                backup_dir=job.backup_dir, retention_days=job.retention_days, remote=job.remote
            )
        jobs.append({k: v for k, v in entry.items() if v is not None})
    return jobs


def build_extravars(fraise, env, request: DeploymentRequest) -> dict[str, Any]:
    """Extra vars for one deployment: trusted role vars, then the request, wrapped unsafe."""
    out = role_vars(fraise, env)
    # The environment's own `vars` are trusted and may override role defaults.
    out.update(_plain(env.vars or {}))
    out.update(
        {
            "fraisier_deployment_id": request.deployment_id,
            "fraisier_fraise": fraise.name,
            "fraisier_environment": env.key,
            "fraisier_serial": str(env.serial) if env.serial is not None else "100%",
            "fraisier_trigger": unsafe(request.trigger),
            "fraisier_commit": unsafe(request.commit),
            "fraisier_branch": unsafe(request.branch),
            "fraisier_commit_message": unsafe(request.commit_message),
            "fraisier_author": unsafe(request.author),
            "fraisier_requested_by": unsafe(request.requested_by),
            "fraise_release_id": unsafe(request.release_id),
            "fraise_release_archive": unsafe(request.archive_path),
        }
    )
    if request.rollback_to is not None:
        out["fraise_release_rollback_to"] = unsafe(request.rollback_to)
    for key, value in request.extra.items():
        # Extras add variables; they never replace what the config or Fraisier set.
        out.setdefault(key, unsafe(value))
    return out
