"""Pure translation: config + one deployment request -> Ansible inventory and extra vars.

Nothing here reads files, the environment or the network, so every rule is
tested without Ansible. Strings from fraises.yaml are trusted (they may use
Jinja, e.g. a per-host health URL); every string that comes from outside it
(webhook, commit, CLI argument) is wrapped as `{"__ansible_unsafe": ...}`,
because ansible-core templates plain extra vars: a commit message holding
`{{ lookup('pipe', ...) }}` would otherwise run on the controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TARGET_GROUP = "fraisier_targets"
UNSAFE_KEY = "__ansible_unsafe"


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
    else:
        out[f"fraise_{fraise.type}_config"] = _plain(env)
    return {k: v for k, v in out.items() if v is not None}


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
