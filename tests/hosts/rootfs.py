"""The one Debian root every test host boots from: built once, cached, rebuilt on recipe change."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .env import HostError, cache_dir

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "openssh-server",
    "iproute2",
    "sudo",
    "git",
    "curl",
    "rsync",
    "procps",
)

# Timers that would wake every host at random to do work no test asked for, and a getty
# that would only fight over a console nobody reads.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "console-getty.service",
    "getty@tty1.service",
    "systemd-timesyncd.service",
)

# Runs inside the fresh root (chroot). Host keys are made here once so that no host
# spends its boot generating them; an empty machine-id lets each host get its own.
SETUP_SCRIPT = f"""set -eu
ssh-keygen -A
: > /etc/machine-id
rm -f /etc/hostname /var/lib/dbus/machine-id
for unit in {" ".join(MASKED_UNITS)}; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
"""

BUILD_TIMEOUT = 1800


@dataclass(frozen=True)
class Root:
    """A finished root and the key pair that opens every host booted from it."""

    path: Path
    private_key: Path
    public_key: Path


def key_paths(cache: Path | None = None) -> tuple[Path, Path]:
    """Paths of the private and public SSH key kept beside the cached root."""
    cache = cache or cache_dir()
    return cache / "id_ed25519", cache / "id_ed25519.pub"


def recipe_hash(public_key: str) -> str:
    """Hash of everything that decides what the root contains."""
    recipe = {
        "suite": SUITE,
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "setup": SETUP_SCRIPT,
        "public_key": public_key.strip(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


@contextmanager
def build_lock(cache: Path | None = None) -> Iterator[None]:
    """Hold the cache's build lock, so that pytest and molecule never build at the same time."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"testhosts: waiting for another build of {cache}/rootfs", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_key_pair(cache: Path | None = None) -> tuple[Path, Path]:
    """Create the ed25519 key pair beside the cache unless it exists."""
    private, public = key_paths(cache)
    if private.exists() and public.exists():
        return private, public
    private.parent.mkdir(parents=True, exist_ok=True)
    for path in (private, public):
        path.unlink(missing_ok=True)
    _run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "fraisier-testhosts",
            "-f",
            str(private),
        ],
        what="generate the test hosts' SSH key",
    )
    private.chmod(0o600)
    return private, public


def ensure_root(cache: Path | None = None) -> Root:
    """Return the cached root, building it first when it is missing or its recipe changed."""
    cache = cache or cache_dir()
    with build_lock(cache):
        private, public = ensure_key_pair(cache)
        wanted = recipe_hash(public.read_text())
        root = cache / "rootfs"
        stamp = cache / "rootfs.recipe"
        current = stamp.read_text().strip() if stamp.exists() else None
        if root.is_dir() and current == wanted:
            return Root(root, private, public)
        for stale in cache.glob("rootfs.*-*"):
            remove_tree(stale)
        print(
            f"testhosts: building the Debian {SUITE} root in {root} (about a minute)",
            file=sys.stderr,
        )
        building = cache / f"rootfs.build-{os.getpid()}"
        build_root(building, public.read_text(), log=cache / "build.log")
        # Swap by rename so that a reader never sees half a root; the recipe is written
        # last, so an interruption between the two renames only costs a rebuild.
        stamp.unlink(missing_ok=True)
        old = cache / f"rootfs.old-{os.getpid()}"
        if root.exists():
            root.rename(old)
        building.rename(root)
        _write_atomic(stamp, wanted + "\n")
        if old.exists():
            remove_tree(old)
        return Root(root, private, public)


def build_root(target: Path, public_key: str, log: Path) -> float:
    """Build a bootable root into `target` (which must not exist); return the seconds it took."""
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _run(
            [
                "debootstrap",
                f"--variant={VARIANT}",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(target),
            ],
            what=f"debootstrap {SUITE} into {target}",
            log=log,
        )
        _run(
            ["chroot", str(target), "/bin/sh", "-c", SETUP_SCRIPT],
            what=f"set up the root in {target}",
            log=log,
        )
        ssh_dir = target / "root" / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        ssh_dir.chmod(0o700)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(public_key.strip() + "\n")
        keys.chmod(0o600)
    except BaseException:
        remove_tree(target)
        raise
    return time.monotonic() - started


def remove_tree(path: Path) -> None:
    """Delete a (possibly half-built) root, first unmounting whatever debootstrap left mounted."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    mounts = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    # --one-file-system: never follow into a mount that could not be undone.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.rename(path)


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    if log is None:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        output = result.stdout + result.stderr
    else:
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(cmd)}\n")
            handle.flush()
            result = subprocess.run(
                cmd,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=BUILD_TIMEOUT,
            )
        output = "\n".join(log.read_text().splitlines()[-15:])
    if result.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise HostError(f"could not {what}: exit {result.returncode}{where}\n{output}")
