"""Reading and validating fraises.yaml.

The file is read with a YAML loader that remembers the line of every key, `${VAR}`
references are expanded from the environment given, and the result is validated into
frozen models (fraisier.model). Every problem is reported with its dotted key path and line.
This is the only module that reads environment variables for the configuration.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from fraisier.cron import CronError, CronSchedule, parse_cron
from fraisier.errors import ConfigError, NotFoundError
from fraisier.model import (
    Field,
    Model,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "BUILTIN_PROVIDERS",
    "CONFIG_ENV_VAR",
    "FRAISE_TYPES",
    "SECRET_MASK",
    "SYSTEM_CONFIG_PATH",
    "AnsibleSettings",
    "Build",
    "Config",
    "Database",
    "Environment",
    "Fraise",
    "GitProviderSettings",
    "GitSettings",
    "HealthCheck",
    "Job",
    "Service",
    "Target",
    "UnsetVariable",
    "check_branch_name",
    "find_config_path",
    "is_secret_key",
    "load_config",
]

SECRET_MASK = "***"
CONFIG_ENV_VAR = "FRAISIER_CONFIG"
SSH_KEY_ENV_VAR = "FRAISIER_SSH_KEY"
WEBHOOK_SECRET_ENV_VAR = "FRAISIER_WEBHOOK_SECRET"
CONFIG_FILE_NAME = "fraises.yaml"
SYSTEM_CONFIG_PATH = Path("/etc/fraisier") / CONFIG_FILE_NAME
FRAISE_TYPES = ("api", "etl", "scheduled", "backup")
BUILTIN_PROVIDERS = ("github", "gitlab", "gitea", "forgejo", "bitbucket", "bitbucket_server")
# Where a provider has no section of its own, it shares its sibling's secrets.
_PROVIDER_FALLBACK = {"forgejo": "gitea", "bitbucket_server": "bitbucket"}
DEFAULT_MAX_BODY_BYTES = 25 * 1024 * 1024
DEFAULT_DEPLOY_TIMEOUT = 1800

_SECRET_KEY_RE = re.compile(
    r"secret|passw|token|passphrase|credential|api_?key|private_key$|(^|_)pass$", re.IGNORECASE
)
_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\@-]{1,255}$")
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9:_.\-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_HOST_RE = re.compile(r"^[^\s,#]+$")
_PROVIDER_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAR_REF_RE = re.compile(r"\$(\$?)\{([^}]*)\}")
_SERIAL_RE = re.compile(r"^\s*(\d{1,3})\s*%\s*$")

KeyPath = tuple[str | int, ...]


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a secret whose value must never be shown."""
    return bool(_SECRET_KEY_RE.search(key)) and not key.lower().endswith(("_file", "_path"))


def check_branch_name(name: str) -> str | None:
    """Why `name` is not a valid git branch name, or None when it is."""
    if not name:
        return "a branch name cannot be empty"
    if name.startswith("-"):
        return "a branch name cannot start with '-'"
    if name == "@" or "@{" in name:
        return "a branch name cannot be '@' or contain '@{'"
    if ".." in name:
        return "a branch name cannot contain '..'"
    for char in name:
        if char.isspace() or ord(char) < 32 or ord(char) == 127 or char in "~^:?*[\\":
            return f"a branch name cannot contain {char!r}"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "a branch name cannot start or end with '/' or contain '//'"
    if name.endswith("."):
        return "a branch name cannot end with '.'"
    for part in name.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "no part of a branch name can start with '.' or end with '.lock'"
    return None


# --------------------------------------------------------------------------- YAML


@dataclass(frozen=True)
class _EnvTag:
    """A `!envvar NAME` node, the spelling of the earlier Fraisier."""

    name: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that also understands `!envvar NAME`."""


def _construct_envvar(loader: yaml.SafeLoader, node: yaml.Node) -> _EnvTag:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(
            None, None, "!envvar takes a variable name", node.start_mark
        )
    return _EnvTag(loader.construct_scalar(node).strip())


_Loader.add_constructor("!envvar", _construct_envvar)


@dataclass
class _Document:
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    duplicates: list[tuple[KeyPath, int]] = field(default_factory=list)


def _read_yaml(path: Path, text: str) -> _Document:
    loader = _Loader(text)
    doc = _Document(data=None)
    try:
        node = loader.get_single_node()
        if node is not None:
            doc.data = _build(loader, node, (), doc, set())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "cannot be parsed"
        raise _error([f"{path}: invalid YAML{where}: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise _error([f"{path}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    return doc


def _build(loader: _Loader, node: yaml.Node, path: KeyPath, doc: _Document, active: set) -> Any:
    """Turn a composed node into plain data while recording the line of every key."""
    if id(node) in active:
        mark = node.start_mark
        raise yaml.constructor.ConstructorError(None, None, "recursive alias", mark)
    if isinstance(node, yaml.MappingNode):
        active = active | {id(node)}
        loader.flatten_mapping(node)
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain names", key_node.start_mark
                )
            # The key's own text: `on:` stays "on" instead of YAML 1.1's True.
            key = key_node.value
            key_path = (*path, key)
            line = key_node.start_mark.line + 1
            if key in result:
                doc.duplicates.append((key_path, line))
            doc.lines[key_path] = line
            result[key] = _build(loader, value_node, key_path, doc, active)
        return result
    if isinstance(node, yaml.SequenceNode):
        active = active | {id(node)}
        items = []
        for index, item in enumerate(node.value):
            doc.lines.setdefault((*path, index), item.start_mark.line + 1)
            items.append(_build(loader, item, (*path, index), doc, active))
        return items
    return loader.construct_object(node, deep=True)


# --------------------------------------------------------------------------- ${VAR}


class UnsetVariable(Model):
    """A `${VAR}` whose variable was not set when the file was loaded."""

    path: tuple[str | int, ...]
    variable: str
    line: int | None = None

    @property
    def key_path(self) -> str:
        """The dotted key path of the value that needs the variable."""
        return _dotted(self.path)


def _expand_tree(
    data: Any, environ: Mapping[str, str], path: KeyPath, unset: list, problems: list
) -> Any:
    if isinstance(data, dict):
        return {k: _expand_tree(v, environ, (*path, k), unset, problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_tree(v, environ, (*path, i), unset, problems) for i, v in enumerate(data)]
    if isinstance(data, _EnvTag):
        if not _ENV_NAME_RE.match(data.name):
            problems.append((path, f"!envvar needs a variable name, got {data.name!r}"))
            return None
        if data.name in environ:
            return environ[data.name]
        unset.append((path, data.name))
        return "${" + data.name + "}"
    if isinstance(data, str) and "${" in data:
        return _expand_string(data, environ, path, unset, problems)
    return data


def _expand_string(
    text: str, environ: Mapping[str, str], path: KeyPath, unset: list, problems: list
) -> str:
    def replace(match: re.Match) -> str:
        if match.group(1):
            # `$${X}` is the escape for a literal `${X}`.
            return match.group(0)[1:]
        inner = match.group(2)
        name, sep, default = inner.partition(":-")
        if not _ENV_NAME_RE.match(name) or "${" in default:
            problems.append((path, f"invalid variable reference {match.group(0)!r}"))
            return match.group(0)
        value = environ.get(name)
        if value:
            return value
        if sep:
            return default
        if value is None:
            unset.append((path, name))
            return match.group(0)
        return value

    return _VAR_REF_RE.sub(replace, text)


# --------------------------------------------------------------------------- models


class _Model(Model):
    # Fields filled from the surrounding mapping keys, never written by users.
    _internal: ClassVar[frozenset[str]] = frozenset()


def _context(info: ValidationInfo) -> dict:
    return info.context or {}


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(_context(info).get("base_dir") or Path.cwd()) / path
    return path


def _one_or_many(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, str | int):
        return (value,)
    return value


def _pending(value: Any) -> bool:
    """Whether a string still holds a `${VAR}` whose variable is unset; its checks wait."""
    return isinstance(value, str) and "${" in value


def _check_unit(value: str | None) -> str | None:
    if value is not None and not _pending(value) and not _UNIT_RE.match(value):
        raise ValueError(f"{value!r} is not a valid systemd unit name")
    return value


def _check_absolute(value: str | None) -> str | None:
    if value is not None and not _pending(value) and not value.startswith(("/", "{{")):
        raise ValueError(f"expected an absolute path on the host, got {value!r}")
    return value


class GitProviderSettings(_Model):
    """The `git.<provider>` section: webhook secrets and options of one provider."""

    webhook_secret: tuple[str, ...] = ()
    base_url: str | None = None
    allow_sha1: bool = False

    @model_validator(mode="before")
    @classmethod
    def _secret_token(cls, data: Any) -> Any:
        # GitLab calls its shared secret a "secret token".
        if isinstance(data, dict) and "secret_token" in data:
            data = dict(data)
            token = data.pop("secret_token")
            if "webhook_secret" in data:
                raise ValueError("give either webhook_secret or secret_token, not both")
            data["webhook_secret"] = token
        return {} if data is None else data

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _secrets(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("webhook_secret")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not secret for secret in value):
            raise ValueError("a webhook secret cannot be empty")
        return value


class GitSettings(_Model):
    """The `git` section: which provider sends pushes and how they are verified."""

    provider: str = "github"
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    providers: dict[str, GitProviderSettings] = {}

    _known: ClassVar[tuple[str, ...]] = ("provider", "max_body_bytes")

    @model_validator(mode="before")
    @classmethod
    def _collect_sections(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, dict):
            return data
        out = {"providers": {}}
        for key, value in data.items():
            if key in cls._known:
                out[key] = value
            elif isinstance(value, dict) or (value is None and key in BUILTIN_PROVIDERS):
                out["providers"][key] = value or {}
            else:
                out[key] = value
        return out

    @field_validator("provider")
    @classmethod
    def _provider_name(cls, value: str) -> str:
        value = value.strip().lower()
        if not _PROVIDER_RE.match(value):
            raise ValueError(f"{value!r} is not a provider name (e.g. github, gitlab, gitea)")
        return value

    def section(self, provider: str) -> tuple[str, GitProviderSettings] | None:
        """The settings section that serves `provider`, and its key, or None."""
        for name in (provider, _PROVIDER_FALLBACK.get(provider)):
            if name and name in self.providers:
                return name, self.providers[name]
        return None


class AnsibleSettings(_Model):
    """The `ansible` section: inventory, roles and connection defaults for every run."""

    inventory: Path | None = None
    roles_path: tuple[Path, ...] = ()
    vars: dict[str, Any] = {}
    forks: int | None = Field(default=None, gt=0)
    private_key_file: Path | None = None
    remote_user: str | None = None
    become: bool | None = None
    vault_password_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _ssh_key_from_env(cls, data: Any, info: ValidationInfo) -> Any:
        if data is None:
            data = {}
        if isinstance(data, dict) and "private_key_file" not in data:
            environ = _context(info).get("environ", os.environ)
            key = environ.get(SSH_KEY_ENV_VAR)
            if key:
                data = {**data, "private_key_file": key}
        return data

    @field_validator("inventory", mode="before")
    @classmethod
    def _inventory(cls, value: Any, info: ValidationInfo) -> Any:
        path = _resolve_path(value, info)
        if isinstance(path, Path) and not _pending(value) and not path.exists():
            raise ValueError(
                f"inventory {str(path)!r} does not exist (relative paths start from the "
                "folder of the config file)"
            )
        return path

    @field_validator("roles_path", mode="before")
    @classmethod
    def _roles_path(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(os.pathsep) if part]
        if isinstance(value, list):
            return tuple(_resolve_path(item, info) for item in value)
        return _one_or_many(value)

    @field_validator("private_key_file", "vault_password_file", mode="before")
    @classmethod
    def _paths(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve_path(value, info) if value != "" else None


class Database(_Model):
    """How an environment's database is migrated during a deployment."""

    name: str | None = None
    strategy: Literal["apply", "rebuild", "none"] = "apply"
    migrate_command: str | None = None
    allow_rebuild: bool = False
    compile_command: str | None = None


class HealthCheck(_Model):
    """An HTTP check that must pass before a deployment counts as good."""

    url: str
    timeout: int = Field(default=10, gt=0)
    retries: int = Field(default=5, ge=0)
    delay: int = Field(default=3, ge=0)
    status_code: tuple[int, ...] = (200,)
    from_: Literal["host", "controller"] = Field(default="host", alias="from")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not _pending(value) and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("status_code", mode="before")
    @classmethod
    def _codes(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("status_code")
    @classmethod
    def _code_range(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for code in value:
            if not 100 <= code <= 599:
                raise ValueError(f"HTTP status {code} out of range 100-599")
        if not value:
            raise ValueError("give at least one status code")
        return value


class Build(_Model):
    """A command run in the new release before it goes live."""

    command: str

    @model_validator(mode="before")
    @classmethod
    def _plain_command(cls, data: Any) -> Any:
        return {"command": data} if isinstance(data, str) else data


class Service(_Model):
    """The systemd service an api fraise runs as."""

    exec_start: str | None = None
    user: str | None = None
    working_directory: str | None = None
    environment: dict[str, str] = {}

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not _ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if "\n" in item:
                raise ValueError(f"the value of {key} spans several lines")
        return value


class Job(_Model):
    """One scheduled job of a scheduled or backup fraise, run by a systemd timer."""

    _internal = frozenset({"key"})

    key: str
    schedule: str
    description: str | None = None
    systemd_service: str | None = None
    systemd_timer: str | None = None
    script_path: str | None = None
    command: str | None = None
    user: str | None = None
    persistent: bool = True
    randomized_delay: int | None = Field(default=None, ge=0)
    enabled: bool = True
    retention_days: int | None = Field(default=None, ge=1)
    backup_dir: str | None = None
    remote: str | None = None
    depends_on: tuple[str, ...] = ()

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            parse_cron(value)
        except CronError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("systemd_service", "systemd_timer")
    @classmethod
    def _units(cls, value: str | None) -> str | None:
        return _check_unit(value)

    @field_validator("backup_dir")
    @classmethod
    def _backup_dir(cls, value: str | None) -> str | None:
        return _check_absolute(value)

    @field_validator("depends_on", mode="before")
    @classmethod
    def _depends(cls, value: Any) -> Any:
        return _one_or_many(value)

    @property
    def cron(self) -> CronSchedule:
        """The parsed schedule."""
        return parse_cron(self.schedule)


class Environment(_Model):
    """One environment of a fraise: where and how it is deployed."""

    _internal = frozenset({"key", "fraise"})

    key: str
    fraise: str
    name: str | None = None
    branch: str | None = None
    repository: str | None = None
    app_path: str | None = None
    systemd_service: str | None = None
    database: Database | None = None
    health_check: HealthCheck | None = None
    hosts: dict[str, dict[str, Any]] | None = None
    inventory_group: str | None = None
    keep_releases: int = Field(default=5, ge=1)
    serial: int | str | None = None
    vars: dict[str, Any] = {}
    playbook: Path | None = None
    build: Build | None = None
    timeout: int = Field(default=DEFAULT_DEPLOY_TIMEOUT, gt=0)
    service: Service | None = None
    shared_paths: tuple[str, ...] = ()
    script_path: str | None = None
    run_on: Literal["first", "all"] = "first"
    jobs: dict[str, Job] = {}

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return data
        data = _clone_url(data)
        jobs = data.get("jobs")
        if isinstance(jobs, dict):
            data["jobs"] = {
                key: {**job, "key": key} if isinstance(job, dict) else job
                for key, job in jobs.items()
            }
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _pending(value) and not _HOST_RE.match(value):
            raise ValueError(f"{value!r} is not a host name")
        return value

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str | None) -> str | None:
        reason = None if value is None or _pending(value) else check_branch_name(value)
        if reason:
            raise ValueError(f"invalid branch {value!r}: {reason}")
        return value

    @field_validator("app_path")
    @classmethod
    def _app_path(cls, value: str | None) -> str | None:
        return _check_absolute(value)

    @field_validator("systemd_service")
    @classmethod
    def _unit(cls, value: str | None) -> str | None:
        return _check_unit(value)

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if not all(isinstance(host, str) for host in value):
                raise ValueError("expected a list of host names")
            value = dict.fromkeys(value)
        if not isinstance(value, dict):
            return value
        if not value:
            raise ValueError("give at least one host, or leave hosts out")
        hosts = {}
        for host, host_vars in value.items():
            if not _HOST_RE.match(host):
                raise ValueError(f"{host!r} is not a host name")
            host_vars = {} if host_vars is None else host_vars
            if not isinstance(host_vars, dict):
                raise ValueError(f"the variables of host {host!r} must be a mapping")
            hosts[host] = host_vars
        return hosts

    @field_validator("serial", mode="before")
    @classmethod
    def _serial(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError(f"expected a positive integer or a percentage, got {value}")
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            if int(value) < 1:
                raise ValueError(f"serial must be at least 1, got {value}")
            return int(value)
        if isinstance(value, str) and (match := _SERIAL_RE.match(value)):
            if not 1 <= int(match.group(1)) <= 100:
                raise ValueError(f"serial percentage must be 1%-100%, got {value!r}")
            return f"{int(match.group(1))}%"
        raise ValueError(f"expected a positive integer or a percentage like '30%', got {value!r}")

    @field_validator("playbook", mode="before")
    @classmethod
    def _playbook(cls, value: Any, info: ValidationInfo) -> Any:
        path = _resolve_path(value, info)
        if isinstance(path, Path) and not _pending(value) and not path.is_file():
            raise ValueError(
                f"playbook {str(path)!r} does not exist (relative paths start from the "
                "folder of the config file)"
            )
        return path

    @field_validator("shared_paths", mode="before")
    @classmethod
    def _shared(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("shared_paths")
    @classmethod
    def _shared_relative(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if item.startswith("/") or ".." in Path(item).parts or not item:
                raise ValueError(
                    f"shared path {item!r} must be relative to the release, without '..'"
                )
        return value

    @property
    def build_command(self) -> str | None:
        """The build command, if the environment has one."""
        return self.build.command if self.build else None

    def host_names(self) -> list[str]:
        """The hosts this environment deploys to, for display: hosts, @group or name."""
        if self.hosts:
            return list(self.hosts)
        if self.inventory_group:
            return [f"@{self.inventory_group}"]
        return [self.name] if self.name else []


def _clone_url(data: dict) -> dict:
    data = dict(data)
    if "clone_url" in data:
        url = data.pop("clone_url")
        if "repository" in data:
            raise ValueError("give either repository or clone_url, not both")
        data["repository"] = url
    return data


class Fraise(_Model):
    """A deployable service and its environments."""

    _internal = frozenset({"name"})

    name: str
    type: Literal["api", "etl", "scheduled", "backup"]
    description: str | None = None
    repository: str | None = None
    environments: dict[str, Environment] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _clone_url(data)
        envs = data.get("environments")
        if isinstance(envs, dict):
            prepared = {}
            for key, env in envs.items():
                if env is None:
                    env = {}
                if isinstance(env, dict):
                    env = {**env, "key": key, "fraise": data.get("name")}
                    has_own = "repository" in env or "clone_url" in env
                    if not has_own and data.get("repository") is not None:
                        env["repository"] = data["repository"]
                prepared[key] = env
            data["environments"] = prepared
        return data


class Target(_Model):
    """A fraise and one of its environments, as a push to a branch deploys them."""

    fraise: str
    environment: str


class _FileModel(_Model):
    """The shape of the file itself, before it becomes a Config."""

    git: GitSettings = Field(default_factory=GitSettings)
    ansible: AnsibleSettings = Field(default_factory=AnsibleSettings)
    fraises: dict[str, Fraise]
    branch_mapping: dict[str, tuple[Target, ...]] = {}

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # Run the ansible section's validators even when it is absent, for its defaults.
        if data.get("ansible") is None:
            data["ansible"] = {}
        if data.get("git") is None:
            data["git"] = {}
        if data.get("branch_mapping") is None:
            data["branch_mapping"] = {}
        fraises = data.get("fraises")
        if isinstance(fraises, dict):
            data["fraises"] = {
                name: {**fraise, "name": name} if isinstance(fraise, dict) else fraise
                for name, fraise in fraises.items()
            }
        return data

    @field_validator("branch_mapping", mode="before")
    @classmethod
    def _mapping(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, dict) else v for k, v in value.items()}
        return value


class Config(_Model):
    """The validated contents of fraises.yaml."""

    path: Path
    git: GitSettings
    ansible: AnsibleSettings
    fraises: dict[str, Fraise]
    branch_mapping: dict[str, tuple[Target, ...]]
    warnings: tuple[str, ...] = ()
    unresolved: tuple[UnsetVariable, ...] = ()
    # FRAISIER_WEBHOOK_SECRET, for providers whose section names no secret of its own.
    default_webhook_secret: tuple[str, ...] = ()

    def fraise(self, name: str) -> Fraise:
        """The fraise called `name`; NotFoundError listing the known ones otherwise."""
        try:
            return self.fraises[name]
        except KeyError:
            known = ", ".join(self.fraises) or "none"
            raise NotFoundError(
                f"unknown fraise {name!r} (known: {known}) in {self.path}"
            ) from None

    def environment(self, fraise_name: str, env_name: str) -> Environment:
        """One environment of one fraise; NotFoundError naming both otherwise."""
        fraise = self.fraise(fraise_name)
        try:
            return fraise.environments[env_name]
        except KeyError:
            known = ", ".join(fraise.environments)
            raise NotFoundError(
                f"fraise {fraise_name!r} has no environment {env_name!r} "
                f"(known: {known}) in {self.path}"
            ) from None

    def targets_for_branch(self, branch: str) -> tuple[Target, ...]:
        """What a push to `branch` deploys: branch_mapping if it names the branch, else
        every environment whose `branch` is that branch."""
        if branch in self.branch_mapping:
            return self.branch_mapping[branch]
        return tuple(
            Target(fraise=fraise.name, environment=env.key)
            for fraise in self.fraises.values()
            for env in fraise.environments.values()
            if env.branch == branch
        )

    def webhook_secrets(self, provider: str) -> tuple[str, ...]:
        """The secrets a webhook from `provider` may be signed with; () if none are set."""
        found = self.git.section(provider.replace("-", "_"))
        if found is None:
            return self.default_webhook_secret
        key, section = found
        for unset in self.unresolved:
            if unset.path[:2] == ("git", key) and unset.path[2:3] in (
                ("webhook_secret",),
                ("secret_token",),
            ):
                raise self._unset_error(unset, "export it before starting Fraisier")
        return section.webhook_secret or self.default_webhook_secret

    def require_resolved(self, fraise_name: str, env_name: str) -> Environment:
        """The environment, after checking every `${VAR}` a deployment of it needs is set."""
        env = self.environment(fraise_name, env_name)
        for unset in self.unresolved:
            path = unset.path
            if path[:1] == ("ansible",) or (
                path[:2] == ("fraises", fraise_name)
                and (path[2:3] != ("environments",) or path[3:4] == (env_name,))
            ):
                raise self._unset_error(unset, f"it is needed to deploy {fraise_name}/{env_name}")
        return env

    def _unset_error(self, unset: UnsetVariable, hint: str) -> ConfigError:
        where = f" ({self.path.name}:{unset.line})" if unset.line else ""
        return _error(
            [f"{unset.key_path}: environment variable {unset.variable} is not set; {hint}{where}"]
        )

    def redacted(self) -> dict:
        """The effective config as plain JSON data, every secret replaced by SECRET_MASK."""
        data = self.model_dump(
            mode="json",
            by_alias=True,
            exclude={"warnings", "unresolved", "default_webhook_secret"},
        )
        # Provider sections sit directly under git: in the file; show them there.
        git = data["git"]
        data["git"] = {k: v for k, v in git.items() if k != "providers"} | git["providers"]
        unset = {u.variable for u in self.unresolved}
        return _redact(data, unset)

    def secret_values(self) -> tuple[str, ...]:
        """Every resolved secret string in the config, so that output can be checked for it."""
        data = self.model_dump(
            mode="json",
            by_alias=True,
            exclude={"warnings", "unresolved", "default_webhook_secret"},
        )
        unset = {u.variable for u in self.unresolved}
        found: dict[str, None] = dict.fromkeys(self.default_webhook_secret)
        _collect_secrets(data, False, unset, found)
        return tuple(found)


def _mentions_unset(text: str, unset: set[str]) -> bool:
    return any("${" + name + "}" in text for name in unset)


def _redact(data: Any, unset: set[str], secret: bool = False) -> Any:
    if isinstance(data, dict):
        return {
            key: _redact(value, unset, secret or is_secret_key(str(key)))
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [_redact(item, unset, secret) for item in data]
    if isinstance(data, str) and _mentions_unset(data, unset):
        return f"{data} (unset)"
    if secret and data is not None and data != "":
        return SECRET_MASK
    return data


def _collect_secrets(data: Any, secret: bool, unset: set[str], found: dict) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _collect_secrets(value, secret or is_secret_key(str(key)), unset, found)
    elif isinstance(data, list):
        for item in data:
            _collect_secrets(item, secret, unset, found)
    elif secret and data is not None and not isinstance(data, bool) and data != "":
        text = str(data)
        if not _mentions_unset(text, unset):
            found[text] = None


# --------------------------------------------------------------------------- loading


def _error(problems: list[str], warnings: list[str] | None = None) -> ConfigError:
    """A ConfigError whose message is the first problem; all of them in `.problems`."""
    err = ConfigError(problems[0])
    err.problems = list(problems)
    err.warnings = list(warnings or [])
    return err


def find_config_path(
    explicit: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None
) -> Path:
    """The config file to read: explicit, $FRAISIER_CONFIG, ./fraises.yaml, /etc/fraisier/."""
    environ = os.environ if environ is None else environ
    given = [(explicit, "given with --config"), (environ.get(CONFIG_ENV_VAR), CONFIG_ENV_VAR)]
    for value, origin in given:
        if value:
            path = Path(value).expanduser()
            if path.is_dir():
                path = path / CONFIG_FILE_NAME
            if not path.is_file():
                raise _error([f"config file {path} does not exist ({origin})"])
            return path
    candidates = [Path.cwd() / CONFIG_FILE_NAME, SYSTEM_CONFIG_PATH]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise _error(
        [
            f"no {CONFIG_FILE_NAME} found (looked in {looked}); pass --config PATH "
            f"or set {CONFIG_ENV_VAR}"
        ]
    )


def load_config(
    path: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    strict: bool = False,
) -> Config:
    """Find, read and validate fraises.yaml; ConfigError lists every problem found."""
    environ = os.environ if environ is None else environ
    config_path = find_config_path(path, environ=environ).absolute()
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise _error([f"cannot read {config_path}: {reason}"]) from None
    return _load(config_path, text, environ, strict)


@dataclass
class _Report:
    file: Path
    lines: dict[KeyPath, int]
    errors: list[tuple[int | None, str]] = field(default_factory=list)
    warnings: list[tuple[int | None, str]] = field(default_factory=list)

    def line(self, path: KeyPath) -> int | None:
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def add(self, path: KeyPath, message: str, *, warning: bool = False) -> None:
        line = self.line(path)
        text = f"{_dotted(path)}: {message}" if path else message
        if line is not None:
            text += f" ({self.file.name}:{line})"
        (self.warnings if warning else self.errors).append((line, text))

    @staticmethod
    def ordered(items: list[tuple[int | None, str]]) -> list[str]:
        seen: dict[str, None] = {}
        for _, text in sorted(items, key=lambda item: item[0] if item[0] is not None else 1e9):
            seen.setdefault(text, None)
        return list(seen)


def _load(path: Path, text: str, environ: Mapping[str, str], strict: bool) -> Config:
    doc = _read_yaml(path, text)
    if doc.data is None:
        raise _error([f"{path} is empty; it needs at least a fraises: section"])
    if not isinstance(doc.data, dict):
        raise _error(
            [
                f"{path}: the top level must be a mapping with keys such as git, ansible, "
                f"fraises and branch_mapping, got {_describe(doc.data)}"
            ]
        )
    report = _Report(file=path, lines=doc.lines)
    for key_path, _line in doc.duplicates:
        report.add(key_path, "key given twice; the last one wins", warning=True)

    unset_refs: list[tuple[KeyPath, str]] = []
    bad_refs: list[tuple[KeyPath, str]] = []
    data = _expand_tree(doc.data, environ, (), unset_refs, bad_refs)
    for key_path, message in bad_refs:
        report.add(key_path, message)
    unset_at = {key_path: name for key_path, name in unset_refs}

    context = {"base_dir": path.parent, "environ": environ}
    model = _validate(data, context, report, unset_at, {p for p, _ in bad_refs})
    if model is not None:
        _check_semantics(model, report)

    for key_path, name in unset_refs:
        report.add(key_path, f"environment variable {name} is not set", warning=True)

    errors = report.ordered(report.errors)
    warnings = report.ordered(report.warnings)
    if strict:
        errors, warnings = report.ordered(report.errors + report.warnings), []
    if errors or model is None:
        raise _error(errors or [f"{path}: invalid configuration"], warnings)
    return Config(
        path=path,
        git=model.git,
        ansible=model.ansible,
        fraises=model.fraises,
        branch_mapping=model.branch_mapping,
        warnings=tuple(warnings),
        unresolved=tuple(
            UnsetVariable(path=key_path, variable=name, line=report.line(key_path))
            for key_path, name in unset_refs
        ),
        default_webhook_secret=tuple(s for s in [environ.get(WEBHOOK_SECRET_ENV_VAR, "")] if s),
    )


def _validate(
    data: dict,
    context: dict,
    report: _Report,
    unset_at: dict[KeyPath, str],
    reported: set[KeyPath],
) -> _FileModel | None:
    """Validate, turning unknown keys into warnings and dropping them for another pass.

    Unknown keys are deleted from `data` itself: _expand_tree built it afresh for this load.
    """
    for _ in range(10):
        try:
            return _FileModel.model_validate(data, context=context)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        extras = [e for e in errors if e["type"] == "extra_forbidden"]
        if not extras:
            for err in errors:
                key_path = _clean_loc(data, err["loc"], keep_last=err["type"] == "missing")
                if key_path in reported:
                    continue
                name = unset_at.get(key_path)
                if name is not None:
                    message = f"environment variable {name} is not set"
                else:
                    message = _friendly(err)
                report.add(key_path, message)
            return None
        for err in extras:
            key_path = _clean_loc(data, err["loc"])
            known = _delete(data, key_path)
            report.add(key_path, _unknown_key_message(err["loc"]), warning=known)
            if not known:
                return None
    return None


def _unknown_key_message(loc: tuple) -> str:
    # Imported here: only a config with a mistake needs it, every command loads the config.
    import difflib

    candidates = _known_keys(loc[:-1])
    match = difflib.get_close_matches(str(loc[-1]), candidates, n=1, cutoff=0.6)
    return f"unknown key (did you mean {match[0]!r}?)" if match else "unknown key"


def _known_keys(loc: tuple) -> list[str]:
    """The keys the model at validation location `loc` accepts, for did-you-mean."""
    tp: Any = _FileModel
    for element in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, Model):
            fields = {f.key: f for f in tp.schema_fields().values()}
            if element not in fields:
                return []
            tp = fields[element].annotation
            continue
        origin = typing.get_origin(tp)
        if origin in (dict, Mapping):
            tp = typing.get_args(tp)[1]
        elif origin in (tuple, list):
            tp = typing.get_args(tp)[0]
        else:
            return []
    tp = _unwrap(tp)
    if not (isinstance(tp, type) and issubclass(tp, Model)):
        return []
    keys = [f.key for name, f in tp.schema_fields().items() if name not in tp._internal]
    if tp is GitSettings:
        keys = [k for k in keys if k != "providers"] + list(BUILTIN_PROVIDERS)
    return keys


def _unwrap(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_SYNONYMS = {"repository": "clone_url", "webhook_secret": "secret_token"}


def _clean_loc(data: Any, loc: tuple, *, keep_last: bool = False) -> KeyPath:
    """Map a validation location onto the keys of the file, dropping its own markers."""
    out: list[str | int] = []
    node = data
    for index, element in enumerate(loc):
        if isinstance(node, dict):
            for key in (element, _SYNONYMS.get(element)):
                if key is not None and key in node:
                    out.append(key)
                    node = node[key]
                    break
            else:
                if keep_last and index == len(loc) - 1:
                    out.append(element)
            continue
        if isinstance(node, list) and isinstance(element, int) and 0 <= element < len(node):
            out.append(element)
            node = node[element]
    return tuple(out)


def _delete(data: Any, key_path: KeyPath) -> bool:
    """Remove the key at `key_path`; False when it cannot be found."""
    node = data
    for key in key_path[:-1]:
        node = node[key]
    if not key_path or not isinstance(node, dict) or key_path[-1] not in node:
        return False
    del node[key_path[-1]]
    return True


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str | int | float):
        return repr(value)
    return type(value).__name__


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "path": "a path",
}


def _friendly(err: dict) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = _describe(err.get("input"))
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {got}"
    if kind == "int_from_float":
        return f"expected an integer, got {got}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}, got {got}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}, got {got}"
    if kind == "too_short":
        return "must not be empty"
    prefix = kind.split("_", 1)[0]
    if prefix in _EXPECTED:
        return f"expected {_EXPECTED[prefix]}, got {got}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {got}"
    return f"{err['msg']}, got {got}"


def _dotted(path: KeyPath) -> str:
    text = ""
    for element in path:
        if isinstance(element, int):
            text += f"[{element}]"
        else:
            text += f".{element}" if text else str(element)
    return text


def _check_semantics(model: _FileModel, report: _Report) -> None:
    """Checks that span several sections, each reported at the key it is about."""
    inventory_set = model.ansible.inventory is not None

    provider = model.git.provider
    if provider not in BUILTIN_PROVIDERS and model.git.section(provider) is None:
        report.add(
            ("git", "provider"),
            f"{provider!r} is not a built-in provider ({', '.join(BUILTIN_PROVIDERS)}); "
            "it must be registered with fraisier.git.register_provider",
            warning=True,
        )

    for fname, fraise in model.fraises.items():
        fpath: KeyPath = ("fraises", fname)
        if not _NAME_RE.match(fname):
            report.add(fpath, f"invalid fraise name {fname!r}: use letters, digits, '_', '.', '-'")
        for ekey, env in fraise.environments.items():
            epath: KeyPath = (*fpath, "environments", ekey)
            if not _NAME_RE.match(ekey):
                report.add(
                    epath, f"invalid environment name {ekey!r}: use letters, digits, '_', '.', '-'"
                )
            if env.inventory_group is not None:
                if env.hosts is not None:
                    report.add(
                        (*epath, "inventory_group"),
                        "give either hosts or inventory_group, not both",
                    )
                elif not inventory_set:
                    report.add(
                        (*epath, "inventory_group"),
                        "needs ansible.inventory, the inventory that defines the group",
                    )
            _check_jobs(fraise, env, epath, report)

    for branch, targets in model.branch_mapping.items():
        bpath: KeyPath = ("branch_mapping", branch)
        reason = check_branch_name(branch)
        if reason:
            report.add(bpath, f"invalid branch {branch!r}: {reason}")
        for index, target in enumerate(targets):
            tpath = (*bpath, index) if len(targets) > 1 else bpath
            fraise = model.fraises.get(target.fraise)
            if fraise is None:
                known = ", ".join(model.fraises) or "none"
                report.add(tpath, f"unknown fraise {target.fraise!r} (known: {known})")
            elif target.environment not in fraise.environments:
                known = ", ".join(fraise.environments)
                report.add(
                    tpath,
                    f"fraise {target.fraise!r} has no environment {target.environment!r} "
                    f"(known: {known})",
                )


def _check_jobs(fraise: Fraise, env: Environment, epath: KeyPath, report: _Report) -> None:
    scheduled = fraise.type in ("scheduled", "backup")
    if env.jobs and not scheduled:
        report.add(
            (*epath, "jobs"),
            f"jobs only run for fraises of type scheduled or backup, not {fraise.type}",
            warning=True,
        )
    if scheduled and not env.jobs:
        report.add(epath, f"a {fraise.type} fraise needs at least one job under jobs")
    for name, job in env.jobs.items():
        jpath = (*epath, "jobs", name)
        if not _JOB_NAME_RE.match(name):
            report.add(
                jpath,
                f"invalid job name {name!r}: it becomes part of a systemd unit name, "
                "so use only letters, digits, ':', '_', '.', '-'",
            )
        for other in job.depends_on:
            if other == name:
                report.add((*jpath, "depends_on"), "a job cannot depend on itself")
            elif other not in env.jobs:
                known = ", ".join(n for n in env.jobs if n != name) or "none"
                report.add(
                    (*jpath, "depends_on"),
                    f"unknown job {other!r} in this environment (known: {known})",
                )
    cycle = _find_cycle({name: job.depends_on for name, job in env.jobs.items()})
    if cycle:
        report.add(
            (*epath, "jobs", cycle[0], "depends_on"),
            f"jobs depend on each other in a circle: {' -> '.join(cycle)}",
        )


def _find_cycle(graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    done: set[str] = set()
    for start in graph:
        stack: list[str] = []
        on_stack: set[str] = set()

        def visit(node: str, stack=stack, on_stack=on_stack) -> list[str] | None:
            if node in on_stack:
                return [*stack[stack.index(node) :], node]
            if node in done or node not in graph:
                return None
            stack.append(node)
            on_stack.add(node)
            for nxt in graph[node]:
                if nxt != node and (found := visit(nxt)):
                    return found
            stack.pop()
            on_stack.discard(node)
            done.add(node)
            return None

        found = visit(start)
        if found:
            return found
    return None
