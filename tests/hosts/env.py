"""Where the test hosts keep their files, and whether this machine can run them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_CACHE = "/var/cache/fraisier-testhosts"
DEFAULT_RUN = "/run/fraisier-testhosts"

# command -> Debian package that provides it
REQUIRED_COMMANDS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "chroot": "coreutils",
    "setsid": "util-linux",
}


class HostError(RuntimeError):
    """A test host could not be built, booted, reached or stopped."""


def cache_dir() -> Path:
    """Folder holding the cached root, its recipe hash, the SSH key pair and the build lock."""
    return Path(os.environ.get("FRAISIER_TESTHOSTS_CACHE", DEFAULT_CACHE))


def run_dir() -> Path:
    """Folder holding one record per running host (its address claim, log and listen.conf)."""
    return Path(os.environ.get("FRAISIER_TESTHOSTS_RUN", DEFAULT_RUN))


def in_ci() -> bool:
    """True when the CI environment variable says so: host tests must fail there, never skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _wildcard_ssh_listener() -> str | None:
    """Name a listener on *:22 of this machine, which would take port 22 from every host."""
    for table, wildcard in (("/proc/net/tcp", "00000000"), ("/proc/net/tcp6", "0" * 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, port = local.split(":")
            if state == "0A" and port == "0016" and addr == wildcard:
                return "0.0.0.0:22" if table.endswith("tcp") else "[::]:22"
    return None


def missing_requirements() -> str | None:
    """One message naming everything this machine lacks to run test hosts, or None."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("test hosts need root (systemd-nspawn, debootstrap): run as root (sudo)")
    missing = [cmd for cmd in REQUIRED_COMMANDS if shutil.which(cmd) is None]
    if missing:
        packages = sorted({REQUIRED_COMMANDS[cmd] for cmd in missing})
        problems.append(f"{', '.join(missing)} not found: apt-get install -y {' '.join(packages)}")
    listener = _wildcard_ssh_listener()
    if listener:
        problems.append(
            f"this machine listens on {listener}, which leaves no port 22 for the hosts on "
            "127.0.2.N: make its sshd listen on named addresses (ListenAddress) instead"
        )
    return "; ".join(problems) or None
