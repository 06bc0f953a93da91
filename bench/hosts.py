"""Cost of the systemd test hosts: root build, boot of 1 and 10 hosts, memory per host.

    sudo .venv/bin/python bench/hosts.py              # build into a temp dir, then boot
    sudo .venv/bin/python bench/hosts.py --no-build   # boot only, from the cached root
    sudo .venv/bin/python bench/hosts.py --rebuild    # rebuild the cached root itself, timed

Memory per host is the proportional set size (PSS, /proc/PID/smaps_rollup) of every process
in the host's PID namespace plus its systemd-nspawn, and separately the tmpfs its overlay
holds (files the host wrote). cgroup memory is not used: on machines without systemd as
PID 1 the containers share their parent's memory cgroup.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hosts import (
    Host,
    boot_hosts,
    cache_dir,
    ensure_root,
    missing_requirements,
    stop_hosts,
)
from tests.hosts.rootfs import build_root, remove_tree


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def host_processes(host: Host) -> list[int]:
    """PIDs of every process inside the host's PID namespace."""
    namespace = os.readlink(f"/proc/{host.init_pid}/ns/pid")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns/pid") == namespace:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def overlay_kib(host: Host) -> int:
    """KiB the host's writable overlay (a tmpfs) holds, as df sees it inside the host."""
    result = host.ssh("df -k --output=used / | tail -1", check=True)
    return int(result.stdout.strip())


def timed_boot(count: int) -> tuple[float, list[Host]]:
    started = time.monotonic()
    hosts = boot_hosts(count)
    return time.monotonic() - started, hosts


def main() -> int:
    """Print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-build", action="store_true", help="skip timing the root build")
    group.add_argument(
        "--rebuild",
        action="store_true",
        help="time a rebuild of the cached root instead of a build in a temp dir",
    )
    args = parser.parse_args()
    problem = missing_requirements()
    if problem:
        print(f"bench/hosts.py: {problem}", file=sys.stderr)
        return 2

    root = ensure_root()
    if args.rebuild:
        (cache_dir() / "rootfs.recipe").unlink(missing_ok=True)
        started = time.monotonic()
        root = ensure_root()
        print(f"rebuild of the cached root:      {time.monotonic() - started:6.1f} s")
    elif not args.no_build:
        # Same file system as the cache, away from it: the cached root stays untouched.
        scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=cache_dir()))
        try:
            seconds = build_root(
                scratch / "rootfs", root.public_key.read_text(), log=scratch / "build.log"
            )
        finally:
            remove_tree(scratch)
        print(f"root build from nothing:         {seconds:6.1f} s")

    one, hosts = timed_boot(1)
    stop_hosts(hosts)
    print(f"boot 1 host (SSH + systemd up):  {one:6.1f} s")

    ten, hosts = timed_boot(10)
    try:
        print(f"boot 10 hosts (SSH + systemd):   {ten:6.1f} s")
        time.sleep(2)  # let boot-time jobs settle before reading memory
        pss = [
            sum(pss_kib(pid) for pid in host_processes(host)) + pss_kib(host.pid) for host in hosts
        ]
        overlay = [overlay_kib(host) for host in hosts]
        processes = statistics.mean(len(host_processes(host)) for host in hosts)
        print(
            f"memory per host, PSS:            {statistics.mean(pss) / 1024:6.1f} MiB "
            f"(min {min(pss) / 1024:.1f}, max {max(pss) / 1024:.1f}, "
            f"{processes:.0f} processes + systemd-nspawn)"
        )
        print(f"memory per host, overlay tmpfs:  {statistics.mean(overlay) / 1024:6.1f} MiB")
    finally:
        started = time.monotonic()
        stop_hosts(hosts)
        print(f"stop 10 hosts:                   {time.monotonic() - started:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
