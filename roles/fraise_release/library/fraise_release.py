#!/usr/bin/python
"""Release directories of a fraise on one host: inspect, unpack, switch, cleanup."""

from __future__ import annotations

import base64
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: fraise_release
short_description: Manage the release directories of a fraise on one host
description:
  - Keeps C(app_path/releases/<id>), C(app_path/shared) and the C(app_path/current) link.
  - State lives in C(app_path/.fraisier/) - C(history) lists, one id a line, the releases that
    went live and passed their checks; C(pending) names the release that is live but not yet
    checked; C(failed) lists releases that failed their checks.
  - The rollback target is always read from C(history), never guessed from modification times.
options:
  state:
    description: What to do.
    type: str
    required: true
    choices: [inspect, unpack, switch, cleanup]
  app_path:
    description: Absolute path of the application on the host.
    type: path
    required: true
  release_id:
    description: Release to inspect, unpack or protect from cleanup.
    type: str
  archive:
    description: Path on the host of the C(.tar.gz) to unpack (removed after unpacking).
    type: path
  archive_content:
    description:
      - The C(.tar.gz) itself, base64-encoded, for O(state=unpack); the action puts a small
        archive here so that it travels inside the module call.
      - Mutually exclusive with O(archive) and O(src).
    type: str
  src:
    description:
      - Path on the controller of the C(.tar.gz) to unpack (O(state=unpack)); the action
        sends it to the host's temporary dir and unpacks it in the same call. Nothing is
        sent in check mode.
      - Mutually exclusive with O(archive).
    type: path
  build:
    description:
      - Shell command run once in the release directory after it is unpacked
        (O(state=unpack)), with the environment of the task; success leaves
        C(.fraisier-built) in the release, so a release is built once.
      - Empty means no build.
    type: str
  prepare:
    description:
      - Commands run in the release directory, in order, after the build (O(state=unpack)),
        with the environment of the task, every time the release is not the live good one.
      - Each is a dict with C(name) (named in a failure) and C(command) (a shell command).
      - Nothing runs in check mode.
    type: list
    elements: dict
    default: []
  unit:
    description:
      - A systemd unit that goes with the release (O(state=unpack)), handled in the same call
        after the build and prepare commands - C(name) (required), C(unit_dir) (default
        C(/etc/systemd/system)), C(content) (the unit's text), C(lookup) (default true) and
        C(host) (the inventory name, for messages).
      - The look-up is skipped while the release is not unpacked (a dry run).
      - With C(content), the unit file is that text; else, when the release ships
        C(systemd/<name>), the unit file is a copy of it; either is written only when it
        differs (mode 0644) and reported in C(unit.changed).
      - With neither and C(lookup), the unit must already be known to systemd, or the call
        fails naming the unit and the host.
    type: dict
  shared_paths:
    description: Paths relative to the release that link to C(app_path/shared/<path>).
    type: list
    elements: str
    default: []
  owner:
    description: Owner given to unpacked releases and created shared paths.
    type: str
  group:
    description: Group given to unpacked releases and created shared paths.
    type: str
  target:
    description:
      - Release that C(current) must point to (O(state=switch)).
      - With O(rollback) and no target, the last good release other than O(failed) (or else
        other than the live one) is chosen.
      - When there is none, C(current) is removed if it points to O(failed).
      - With O(confirm) and neither O(rollback) nor a target, the live release is confirmed.
    type: str
  confirm:
    description: Record O(target) as good in C(history) (its checks passed or none exist).
    type: bool
    default: false
  failed:
    description: Release that failed its checks; it leaves C(history) and C(pending).
    type: str
  batch:
    description:
      - Hosts that switch together (O(state=switch)); when any of them is no longer in the
        play batch (it failed earlier), no host switches and the task fails naming them. The
        action checks it before calling the host.
    type: list
    elements: str
  report:
    description:
      - Publish the live release as the custom stat C(fraisier_live) (C({host: release})),
        as M(ansible.builtin.set_stats) would; the action does it, nothing in check mode.
    type: bool
    default: false
  rollback:
    description: O(target) is a rollback, so C(history) entries after it are dropped.
    type: bool
    default: false
  cleanup:
    description: Remove old releases after switching.
    type: bool
    default: false
  keep:
    description: Number of good releases to keep; the live and rollback releases are always kept.
    type: int
    default: 5
  probe:
    description: Paths relative to the release whose existence O(state=inspect) reports.
    type: list
    elements: str
    default: []
author: Fraisier
"""

RELEASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MARKER = ".fraisier-release"
BUILT = ".fraisier-built"
UNIT_MODE = 0o644
# Output kept in the result of a build: enough to read a failure, not a whole log.
OUTPUT_TAIL = 4000


class Layout:
    """Paths of one application directory."""

    def __init__(self, app_path):
        self.app = app_path.rstrip("/") or "/"
        self.releases = os.path.join(self.app, "releases")
        self.shared = os.path.join(self.app, "shared")
        self.current = os.path.join(self.app, "current")
        self.state = os.path.join(self.app, ".fraisier")
        self.history = os.path.join(self.state, "history")
        self.pending = os.path.join(self.state, "pending")
        self.failed = os.path.join(self.state, "failed")

    def release(self, release_id):
        return os.path.join(self.releases, release_id)

    def complete(self, release_id):
        return bool(release_id) and os.path.isfile(os.path.join(self.release(release_id), MARKER))


def read_lines(path):
    try:
        with open(path) as handle:
            return [line.strip() for line in handle if line.strip()]
    except FileNotFoundError:
        return []


def write_lines(path, lines):
    # Written aside then renamed, so a reader never sees half a file.
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write("".join(f"{line}\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def remove_file(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def current_target(layout):
    """Release id that `current` points to, or None."""
    try:
        target = os.readlink(layout.current)
    except OSError:
        return None
    return os.path.basename(target.rstrip("/"))


def good_order(layout, history):
    """Good releases still on disk, most recently confirmed first, each once."""
    seen, order = set(), []
    for release_id in reversed(history):
        if release_id not in seen and layout.complete(release_id):
            seen.add(release_id)
            order.append(release_id)
    return order


def snapshot(layout, release_id=None, probe=()):
    """The state of the application directory as the role reads it."""
    history = read_lines(layout.history)
    pending = (read_lines(layout.pending) or [None])[0]
    current = current_target(layout)
    previous_good = next((r for r in good_order(layout, history) if r != current), None)
    data = {
        "current": current,
        "pending": pending,
        "history": history[-20:],
        "previous_good": previous_good,
        "releases": sorted(
            name
            for name in (os.listdir(layout.releases) if os.path.isdir(layout.releases) else [])
            if not name.startswith(".")
        ),
    }
    if release_id:
        release_dir = layout.release(release_id)
        data.update(
            release_id=release_id,
            release_path=release_dir,
            complete=layout.complete(release_id),
            good=release_id in history,
            live=current == release_id,
            live_good=current == release_id and pending != release_id and release_id in history,
            probe={p: os.path.lexists(os.path.join(release_dir, p)) for p in probe},
        )
    return data


def check_relative(module, path):
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or "" in parts or "." in parts:
        module.fail_json(
            msg=f"shared path {path!r} must be relative and plain (no '..', '.', '//' or "
            "leading '/'): fix fraise_release_shared_paths"
        )


def chown(module, path, owner, group):
    if not owner and not group:
        return
    spec = f"{owner or ''}:{group or ''}" if group else owner
    proc = subprocess.run(
        ["chown", "-R", "-h", spec, path], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        module.fail_json(msg=f"chown {spec} {path} failed: {proc.stderr.strip()}")


def link_shared(module, layout, staging, shared_paths, owner, group):
    for rel in shared_paths:
        check_relative(module, rel)
        shared = os.path.join(layout.shared, rel)
        inside = os.path.join(staging, rel)
        if not os.path.lexists(shared):
            os.makedirs(os.path.dirname(shared), exist_ok=True)
            # The first release that ships the path seeds the shared copy; otherwise an
            # empty directory is made (a shared file must be put there by its owner).
            if os.path.lexists(inside) and not os.path.islink(inside):
                shutil.move(inside, shared)
            else:
                os.makedirs(shared)
            chown(module, shared, owner, group)
        if os.path.isdir(inside) and not os.path.islink(inside):
            shutil.rmtree(inside)
        elif os.path.lexists(inside):
            os.unlink(inside)
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        os.symlink(shared, inside)


def do_unpack(module, layout, p):
    release_id = p["release_id"]
    if layout.complete(release_id):
        return False, {}
    if module.check_mode:
        return True, {"msg": f"release {release_id} would be unpacked"}
    for path in (layout.releases, layout.shared, layout.state):
        os.makedirs(path, exist_ok=True)
    archive = p["archive"]
    if p["archive_content"]:
        # Written beside the releases: the same file system, and no temporary dir to make.
        handle, archive = tempfile.mkstemp(prefix=f".{release_id}.", suffix=".tar.gz",
                                           dir=layout.releases)  # fmt: skip
        with os.fdopen(handle, "wb") as out:
            out.write(base64.b64decode(p["archive_content"]))
    if not archive or not os.path.isfile(archive):
        module.fail_json(msg=f"release archive {archive} is missing on the host")
    staging = os.path.join(layout.releases, f".{release_id}.partial")
    final = layout.release(release_id)
    for leftover in (staging, final):
        if os.path.lexists(leftover):
            shutil.rmtree(leftover)
    os.makedirs(staging)
    proc = subprocess.run(
        ["tar", "-xzf", archive, "-C", staging, "--no-same-owner"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        if p["archive_content"]:
            remove_file(archive)
        module.fail_json(msg=f"unpacking {archive} failed: {proc.stderr.strip()}")
    link_shared(module, layout, staging, p["shared_paths"], p["owner"], p["group"])
    chown(module, staging, p["owner"], p["group"])
    os.rename(staging, final)
    # The marker is written last: a release without it is incomplete and unpacked again.
    with open(os.path.join(final, MARKER), "w") as handle:
        handle.write(f"{release_id} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    remove_file(archive)
    return True, {}


def do_build(module, layout, release_id, command):
    release_dir = layout.release(release_id)
    if not layout.complete(release_id) or os.path.exists(os.path.join(release_dir, BUILT)):
        return False, {}
    if module.check_mode:
        return True, {"msg": f"release {release_id} would be built"}
    proc = subprocess.run(
        ["/bin/sh", "-c", f"set -e; {command}"],
        cwd=release_dir,
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    out = {"rc": proc.returncode, "stdout": proc.stdout[-OUTPUT_TAIL:],
           "stderr": proc.stderr[-OUTPUT_TAIL:]}  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        module.fail_json(
            msg=f"build of release {release_id} failed with exit code {proc.returncode}: {last}",
            **out,
        )
    with open(os.path.join(release_dir, BUILT), "w"):
        pass
    return True, {"build": out}


def live_good(layout, release_id):
    """Whether the release is live and has passed its checks."""
    pending = (read_lines(layout.pending) or [None])[0]
    return (
        current_target(layout) == release_id
        and pending != release_id
        and release_id in read_lines(layout.history)
    )


def do_prepare(module, layout, release_id, commands):
    if not layout.complete(release_id) or live_good(layout, release_id):
        return False, {}
    if module.check_mode:
        return True, {"msg": f"release {release_id} would be prepared"}
    done = []
    for step in commands:
        name, command = str(step.get("name") or "command"), str(step.get("command") or "")
        if not command:
            module.fail_json(msg=f"prepare step {name} of release {release_id} has no command")
        proc = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=layout.release(release_id),
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
        out = {"name": name, "rc": proc.returncode, "stdout": proc.stdout[-OUTPUT_TAIL:],
               "stderr": proc.stderr[-OUTPUT_TAIL:]}  # fmt: skip
        done.append(out)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            module.fail_json(
                msg=f"{name} of release {release_id} failed with exit code {proc.returncode}:"
                f" {last}",
                prepared=done,
            )
    return bool(done), {"prepared": done}


def write_if_differs(path, data, check_mode):
    """Write data to path (mode 0644) unless it is already there; whether it changed."""
    try:
        with open(path, "rb") as handle:
            same = handle.read() == data
        same = same and (os.stat(path).st_mode & 0o7777) == UNIT_MODE
    except FileNotFoundError:
        same = False
    if same or check_mode:
        return not same
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written aside then renamed: systemd never reads half a unit.
    handle, tmp = tempfile.mkstemp(prefix=".fraisier-", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(tmp, UNIT_MODE)
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp)
        raise
    return True


def do_unit(module, layout, release_id, unit):
    name = str(unit.get("name") or "")
    if not name or "/" in name:
        module.fail_json(msg=f"unit name {name!r} must be a plain systemd unit name")
    path = os.path.join(str(unit.get("unit_dir") or "/etc/systemd/system"), name)
    shipped = os.path.join(layout.release(release_id), "systemd", name)
    data = None
    if unit.get("content") is not None:
        data = str(unit["content"]).encode()
    elif os.path.isfile(shipped):
        with open(shipped, "rb") as handle:
            data = handle.read()
    if data is not None:
        changed = write_if_differs(path, data, module.check_mode)
        return changed, {"unit": {"name": name, "path": path, "managed": True, "changed": changed}}
    out = {"name": name, "path": path, "managed": False, "changed": False}
    # A dry run of a first deploy did not unpack the release: it cannot tell what ships.
    lookup = unit.get("lookup", True) not in (False, "false", "False", "no")
    if lookup and layout.complete(release_id):
        proc = subprocess.run(
            ["systemctl", "show", "--property=LoadState", "--value", name],
            capture_output=True,
            text=True,
            check=False,
        )
        out["load_state"] = proc.stdout.strip()
        if proc.returncode != 0 or out["load_state"] in ("", "not-found"):
            module.fail_json(
                msg=f"systemd unit {name} not found on host {unit.get('host') or 'this host'}:"
                f" ship it in the release as systemd/{name}, give a service definition,"
                " or install it on the host first",
                unit=out,
            )
    return False, {"unit": out}


def atomic_link(layout, release_id):
    tmp = os.path.join(layout.app, f".current.{os.getpid()}")
    remove_file(tmp)
    os.symlink(os.path.join("releases", release_id), tmp)
    os.replace(tmp, layout.current)


def do_switch(module, layout, p):
    target, failed = p["target"] or None, p["failed"] or None
    current = current_target(layout)
    history = read_lines(layout.history)
    pending = (read_lines(layout.pending) or [None])[0]
    actions = []

    if not target and not p["rollback"] and p["confirm"]:
        # Confirming without a target confirms whatever is live.
        target = current
    if not target and p["rollback"]:
        # The release that failed (or else the live one) is never its own rollback target.
        skip = failed or current
        target = next((r for r in good_order(layout, history) if r != skip), None)
    if target and not layout.complete(target) and module.check_mode and target == p["release_id"]:
        # A dry run did not unpack the release it would switch to.
        actions = [f"switch current from {current} to {target}"]
        return True, {"actions": actions, "previous": current}
    if target and not layout.complete(target):
        module.fail_json(
            msg=f"release {target} is not a complete release under {layout.releases}: "
            "nothing switched"
        )
    new_history = list(history)
    new_pending = pending
    if failed:
        new_history = [r for r in new_history if r != failed]
        if new_pending == failed:
            new_pending = None
    if target and p["rollback"] and target in new_history:
        last = len(new_history) - 1 - new_history[::-1].index(target)
        new_history = new_history[: last + 1]
    if target:
        if p["confirm"]:
            if not new_history or new_history[-1] != target:
                new_history.append(target)
            if new_pending == target:
                new_pending = None
        elif target not in new_history[-1:] or pending == target:
            new_pending = target
        else:
            new_pending = None

    if target and current != target:
        actions.append(f"switch current from {current} to {target}")
    if not target and failed and current == failed:
        actions.append(f"remove current (pointed to failed release {failed})")
    if new_history != history:
        actions.append("update history")
    if new_pending != pending:
        actions.append(f"set pending to {new_pending}")
    if failed:
        actions.append(f"record {failed} as failed")

    if actions and not module.check_mode:
        os.makedirs(layout.state, exist_ok=True)
        if failed:
            with open(layout.failed, "a") as handle:
                handle.write(f"{failed}\n")
        # Pending first: if the host dies mid-switch, the live release is never taken as good.
        if new_pending and new_pending != pending:
            write_lines(layout.pending, [new_pending])
        if target and current != target:
            atomic_link(layout, target)
        if not target and failed and current == failed:
            remove_file(layout.current)
        if new_history != history:
            write_lines(layout.history, new_history)
        if not new_pending:
            remove_file(layout.pending)
    return bool(actions), {"actions": actions, "previous": current}


def do_cleanup(module, layout, p):
    if not os.path.isdir(layout.releases):
        return False, {"removed": []}
    history = read_lines(layout.history)
    current = current_target(layout)
    pending = (read_lines(layout.pending) or [None])[0]
    order = good_order(layout, history)
    previous_good = next((r for r in order if r != current), None)
    keep = set(order[: max(p["keep"], 1)])
    keep.update(r for r in (current, pending, previous_good, p["release_id"]) if r)
    removed = []
    for name in sorted(os.listdir(layout.releases)):
        path = os.path.join(layout.releases, name)
        if name.startswith("."):
            # A staging dir of an interrupted unpack, unless it is being unpacked now.
            if p["release_id"] and name == f".{p['release_id']}.partial":
                continue
        elif name in keep:
            continue
        removed.append(name)
        if not module.check_mode:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                remove_file(path)
    gone = set(removed)
    new_history = [r for r in history if r not in gone and os.path.isdir(layout.release(r))]
    if new_history != history and not module.check_mode:
        write_lines(layout.history, new_history)
    return bool(removed) or new_history != history, {"removed": removed}


def main():
    module = AnsibleModule(
        argument_spec={
            "state": {
                "type": "str",
                "required": True,
                "choices": ["inspect", "unpack", "switch", "cleanup"],
            },
            "app_path": {"type": "path", "required": True},
            "release_id": {"type": "str"},
            "archive": {"type": "path"},
            "archive_content": {"type": "str", "no_log": True},
            "build": {"type": "str"},
            "prepare": {"type": "list", "elements": "dict", "default": []},
            "unit": {"type": "dict"},
            "shared_paths": {"type": "list", "elements": "str", "default": []},
            "owner": {"type": "str"},
            "group": {"type": "str"},
            "target": {"type": "str"},
            "confirm": {"type": "bool", "default": False},
            "failed": {"type": "str"},
            "rollback": {"type": "bool", "default": False},
            "cleanup": {"type": "bool", "default": False},
            "keep": {"type": "int", "default": 5},
            "probe": {"type": "list", "elements": "str", "default": []},
        },
        mutually_exclusive=[("archive", "archive_content")],
        supports_check_mode=True,
    )
    p = module.params
    if not os.path.isabs(p["app_path"]):
        module.fail_json(msg=f"app_path {p['app_path']!r} must be an absolute path")
    for key in ("release_id", "target", "failed"):
        if p[key] and not RELEASE_ID.match(p[key]):
            module.fail_json(msg=f"{key} {p[key]!r} is not a release id ({RELEASE_ID.pattern})")
    if p["state"] == "unpack" and not p["release_id"]:
        module.fail_json(msg="state=unpack needs release_id")
    layout = Layout(p["app_path"])

    changed, extra = False, {}
    if p["state"] != "inspect":
        lock_handle = None
        if not module.check_mode:
            os.makedirs(layout.state, exist_ok=True)
            # Two runs on one host must not interleave their switches.
            lock_handle = open(os.path.join(layout.state, "lock"), "w")  # noqa: SIM115
            fcntl.flock(lock_handle, fcntl.LOCK_EX)
        try:
            if p["state"] == "unpack":
                changed, extra = do_unpack(module, layout, p)
            elif p["state"] == "switch":
                changed, extra = do_switch(module, layout, p)
                if p["cleanup"]:
                    cleaned, more = do_cleanup(module, layout, p)
                    changed = changed or cleaned
                    extra.update(more)
            else:
                changed, extra = do_cleanup(module, layout, p)
        finally:
            if lock_handle:
                lock_handle.close()
    if p["state"] == "unpack" and p["build"]:
        # Outside the lock: a long build must not hold up another run's switch.
        built, more = do_build(module, layout, p["release_id"], p["build"])
        changed = changed or built
        extra.update(more)
    if p["state"] == "unpack" and p["prepare"]:
        prepared, more = do_prepare(module, layout, p["release_id"], p["prepare"])
        changed = changed or prepared
        extra.update(more)
    if p["state"] == "unpack" and p["unit"]:
        installed, more = do_unit(module, layout, p["release_id"], p["unit"])
        changed = changed or installed
        extra.update(more)
    result = snapshot(layout, p["release_id"] or p["target"], p["probe"])
    result.update(extra)
    module.exit_json(changed=changed, **result)


if __name__ == "__main__":
    main()
