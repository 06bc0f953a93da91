"""Real systemd test hosts: systemd-nspawn containers booted from one cached Debian root.

Each host runs its own systemd and sshd on a loopback address 127.0.2.N and is reached by
Ansible over SSH as root. See `python -m tests.hosts --help` for the debugging command.
"""

from .env import HostError, cache_dir, in_ci, missing_requirements, run_dir
from .machines import (
    Host,
    boot_hosts,
    inventory,
    load_state,
    running_hosts,
    save_state,
    stop_hosts,
    write_inventory,
)
from .rootfs import Root, ensure_root

__all__ = [
    "Host",
    "HostError",
    "Root",
    "boot_hosts",
    "cache_dir",
    "ensure_root",
    "in_ci",
    "inventory",
    "load_state",
    "missing_requirements",
    "run_dir",
    "running_hosts",
    "save_state",
    "stop_hosts",
    "write_inventory",
]
