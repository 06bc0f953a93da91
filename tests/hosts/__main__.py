"""Debugging command: boot test hosts, list them, stop them.

python -m tests.hosts up 3        # boot 3 hosts, print their Ansible inventory
python -m tests.hosts status      # list running test hosts
python -m tests.hosts down        # stop the hosts `up` booted
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from .env import HostError, cache_dir, missing_requirements, run_dir
from .machines import (
    Host,
    boot_hosts,
    inventory,
    load_state,
    running_hosts,
    save_state,
    stop_hosts,
)
from .rootfs import ensure_root


def _default_state() -> Path:
    return run_dir() / "cli-state.json"


def molecule_instance(host: Host) -> dict:
    """One entry of molecule's instance config for a host."""
    return {
        "instance": host.name,
        "address": host.address,
        "user": "root",
        "port": 22,
        "identity_file": host.private_key,
    }


def _up(args: argparse.Namespace) -> int:
    names = args.name or None
    count = args.count if args.count is not None else len(names or []) or 1
    state = Path(args.state)
    kept = [host for host in load_state(state) if host.is_running()]
    if args.replace and kept:
        stop_hosts(kept)
        kept = []
    booted = boot_hosts(count, names=names, root=ensure_root(), detached=True)
    save_state(kept + booted, state)
    if args.format == "json":
        print(
            json.dumps(
                [host.to_record() | {"inventory_vars": host.inventory_vars} for host in booted],
                indent=2,
            )
        )
    elif args.format == "molecule":
        print(json.dumps([molecule_instance(host) for host in kept + booted], indent=2))
    else:
        print(
            f"# {len(booted)} host(s) up; stop them with: python -m tests.hosts down "
            f"--state {state}"
        )
        print(yaml.safe_dump(inventory(kept + booted), sort_keys=False), end="")
    return 0


def _down(args: argparse.Namespace) -> int:
    state = Path(args.state)
    hosts = running_hosts() if args.all else load_state(state)
    stop_hosts(hosts)
    if not args.all or state.exists():
        state.unlink(missing_ok=True)
    for host in hosts:
        print(f"stopped {host.name} ({host.address}, PID {host.pid})", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    hosts = running_hosts()
    if args.format == "json":
        print(json.dumps([host.to_record() for host in hosts], indent=2))
        return 0
    print(f"root: {cache_dir() / 'rootfs'}   run folder: {run_dir()}")
    if not hosts:
        print("no test host running")
    for host in hosts:
        owner = "detached" if host.detached else f"owner PID {host.owner}"
        print(f"{host.name:20} {host.address:12} PID {host.pid:<8} {owner}  log {host.log_path}")
    return 0


def _inventory(args: argparse.Namespace) -> int:
    hosts = [host for host in load_state(Path(args.state)) if host.is_running()]
    print(yaml.safe_dump(inventory(hosts), sort_keys=False), end="")
    return 0


def _build(args: argparse.Namespace) -> int:
    if args.rebuild:
        (cache_dir() / "rootfs.recipe").unlink(missing_ok=True)
    root = ensure_root()
    print(root.path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m tests.hosts`."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.hosts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    state_help = "JSON file recording the hosts booted (default: %(default)s)"

    up = commands.add_parser("up", help="boot hosts and print their inventory")
    up.add_argument(
        "count", type=int, nargs="?", help="how many hosts (default: 1, or one per --name)"
    )
    up.add_argument("--name", action="append", help="host name (repeat for each host)")
    up.add_argument("--state", default=str(_default_state()), help=state_help)
    up.add_argument(
        "--replace", action="store_true", help="stop the hosts the state file lists first"
    )
    up.add_argument(
        "--format",
        choices=["yaml", "json", "molecule"],
        default="yaml",
        help="molecule: the instance config list molecule reads (all hosts of --state)",
    )
    up.set_defaults(func=_up)

    down = commands.add_parser("down", help="stop the hosts a state file lists")
    down.add_argument("--state", default=str(_default_state()), help=state_help)
    down.add_argument("--all", action="store_true", help="stop every running test host")
    down.set_defaults(func=_down)

    status = commands.add_parser("status", help="list running test hosts")
    status.add_argument("--format", choices=["text", "json"], default="text")
    status.set_defaults(func=_status)

    inv = commands.add_parser(
        "inventory", help="print the inventory of the hosts a state file lists"
    )
    inv.add_argument("--state", default=str(_default_state()), help=state_help)
    inv.set_defaults(func=_inventory)

    build = commands.add_parser("build", help="build the cached root unless it is up to date")
    build.add_argument("--rebuild", action="store_true", help="build it again even if up to date")
    build.set_defaults(func=_build)

    args = parser.parse_args(argv)
    if args.command != "status":
        problem = missing_requirements()
        if problem:
            print(f"python -m tests.hosts: {problem}", file=sys.stderr)
            return 2
    if args.command == "up" and args.name and args.count not in (None, len(args.name)):
        parser.error(f"{args.count} hosts but {len(args.name)} --name given")
    try:
        return args.func(args)
    except HostError as error:
        print(f"python -m tests.hosts: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
