"""Where the built-in playbooks and roles are, installed or in a source checkout."""

from __future__ import annotations

from pathlib import Path

from fraisier.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent


def builtin_dir(name: str) -> Path:
    """Folder `playbooks` or `roles` shipped with Fraisier.

    A wheel carries them inside the package; an editable install or a source
    checkout has them at the repository root, beside the package.
    """
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"Fraisier's built-in '{name}' folder is missing (looked in {_PACKAGE_DIR} and its"
        " parent); reinstall Fraisier"
    )


def builtin_playbook(fraise_type: str) -> Path:
    """The built-in playbook for a fraise type (api, etl, scheduled, backup) or an action."""
    path = builtin_dir("playbooks") / f"{fraise_type}.yml"
    if not path.is_file():
        raise ConfigError(
            f"no built-in playbook for '{fraise_type}' ({path} is missing); set the environment's"
            " `playbook` key to a playbook of your own"
        )
    return path
