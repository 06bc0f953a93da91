#!/usr/bin/python
"""systemd units and timers of a fraise's jobs on one host, tracked in a manifest."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: fraise_timer
short_description: Install the systemd units and timers of a fraise's jobs
description:
  - Checks every C(OnCalendar=) expression with C(systemd-analyze calendar) before anything
    is written, also in check mode.
  - Writes the unit files given, removes the ones an earlier run installed that are no longer
    given (their timers stopped and disabled first), reloads systemd, then enables and starts
    (or stops and disables) each timer.
  - The files installed are listed in O(manifest). A file that exists but is not in the
    manifest was not installed by Fraisier - it is never overwritten nor removed.
  - Reports each timer's next elapse as systemd computes it.
options:
  unit_dir:
    description: Directory unit files are installed into.
    type: path
    default: /etc/systemd/system
  manifest:
    description: JSON file listing the unit files installed, relative to O(unit_dir).
    type: path
    required: true
  files:
    description:
      - Unit files to install - C(path) relative to O(unit_dir) (a unit, or a drop-in
        C(<unit>.d/<name>.conf)), C(job) for messages, and either C(content) or C(src), a
        file on the host to copy.
    type: list
    elements: dict
    default: []
  timers:
    description:
      - Timers to manage - C(unit), C(job), C(service) (the unit the timer starts),
        C(enabled), and C(on_calendar), the expressions checked with C(systemd-analyze calendar).
      - A service that is neither among O(files) nor known to systemd on the host fails the
        run before anything is written.
    type: list
    elements: dict
    default: []
  release_complete:
    description:
      - Whether the release that may ship units is on the host. In check mode, when it is not,
        a service that cannot be found is not an error (the release might ship it).
    type: bool
    default: true
author: Fraisier
"""


UNIT = r"[A-Za-z0-9:_.@-]+\.(?:service|timer)"
FILE_PATH = re.compile(rf"^{UNIT}(?:\.d/[A-Za-z0-9:_.@-]+\.conf)?$")
SHOW_PROPERTIES = ("Id", "LoadState", "ActiveState", "UnitFileState", "NextElapseUSecRealtime")


def run(module, argv, check=True):
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=module.env)
    if check and proc.returncode != 0:
        module.fail_json(
            msg=f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}",
            stdout=proc.stdout,
        )
    return proc


def parse_elapse(text):
    """A `Fri 2026-11-27 02:00:00 UTC` timestamp as a sortable datetime, or None."""
    match = re.match(r"^\w{3} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text or "")
    return dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S") if match else None


def check_calendars(module, timers):
    """{expression: next elapse} from systemd-analyze; fail naming the job of a bad one."""
    expressions = list(dict.fromkeys(e for t in timers for e in t["on_calendar"]))
    if not expressions:
        return {}
    proc = run(module, ["systemd-analyze", "calendar", "--", *expressions], check=False)
    if proc.returncode != 0:
        for timer in timers:
            for expression in timer["on_calendar"]:
                one = run(module, ["systemd-analyze", "calendar", "--", expression], check=False)
                if one.returncode != 0:
                    module.fail_json(
                        msg=f"job {timer['job']}: OnCalendar={expression} is refused by"
                        f" systemd-analyze calendar on this host ({one.stderr.strip()});"
                        f" fix the job's schedule, nothing was installed"
                    )
        module.fail_json(msg=f"systemd-analyze calendar failed: {proc.stderr.strip()}")
    found, current = {}, None
    for line in proc.stdout.splitlines():
        label, _, value = line.strip().partition(": ")
        if label == "Original form":
            current = value
        elif label == "Next elapse" and current is not None:
            found[current] = value
    # systemd prints blocks in the order given; fall back on that when forms differ.
    if len(found) != len(expressions):
        values = [
            line.strip().partition(": ")[2]
            for line in proc.stdout.splitlines()
            if line.strip().startswith("Next elapse:")
        ]
        found = dict(zip(expressions, values, strict=False))
    for timer in timers:
        nexts = [found.get(e, "never") for e in timer["on_calendar"]]
        if timer["on_calendar"] and all(n == "never" for n in nexts):
            module.fail_json(
                msg=f"job {timer['job']}: OnCalendar={' / '.join(timer['on_calendar'])} never"
                " elapses (systemd-analyze calendar); fix the job's schedule"
            )
    return found


def earliest(values):
    dated = [(parse_elapse(v), v) for v in values]
    dated = [item for item in dated if item[0] is not None]
    return min(dated)[1] if dated else None


def read_manifest(path):
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else None


def write_atomic(path, content, mode=0o644):
    tmp = f"{path}.fraisier-tmp"
    with open(tmp, "w") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_manifest(path, files):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps({"files": sorted(set(files))}, indent=1) + "\n", 0o600)


def read_text(path):
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def unit_of(path):
    """The unit a unit file or drop-in belongs to."""
    return path.split("/", 1)[0][: -len(".d")] if "/" in path else path


def show(module, units):
    """{unit: {property: value}} from one systemctl show."""
    if not units:
        return {}
    argv = ["systemctl", "show", *(f"--property={p}" for p in SHOW_PROPERTIES), "--", *units]
    proc = run(module, argv)
    states, block = {}, {}
    for line in [*proc.stdout.splitlines(), ""]:
        if not line.strip():
            if block.get("Id"):
                states[block["Id"]] = block
            block = {}
            continue
        key, _, value = line.partition("=")
        block[key] = value
    # `Id` is the unit's own name except for aliases; fall back on the order asked.
    ordered = list(states.values())
    return {
        u: states.get(u) or (ordered[i] if i < len(ordered) else {}) for i, u in enumerate(units)
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "unit_dir": {"type": "path", "default": "/etc/systemd/system"},
            "manifest": {"type": "path", "required": True},
            "files": {"type": "list", "elements": "dict", "default": []},
            "timers": {"type": "list", "elements": "dict", "default": []},
            "release_complete": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    module.env = {**os.environ, "LC_ALL": "C", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    p = module.params
    unit_dir, manifest_path = p["unit_dir"], p["manifest"]

    files = {}
    for item in p["files"]:
        path = str(item.get("path") or "")
        if not FILE_PATH.match(path):
            module.fail_json(
                msg=f"job {item.get('job')}: {path!r} is not a unit file name (letters, digits,"
                " ':', '_', '.', '@', '-', ending in .service or .timer); nothing was installed"
            )
        if path in files:
            module.fail_json(msg=f"unit file {path} is given twice (jobs {item.get('job')})")
        files[path] = item
    timers = []
    for item in p["timers"]:
        unit = str(item.get("unit") or "")
        if not re.fullmatch(UNIT, unit) or not unit.endswith(".timer"):
            module.fail_json(msg=f"job {item.get('job')}: {unit!r} is not a timer unit name")
        timers.append(
            {
                "unit": unit,
                "job": item.get("job") or unit,
                "service": str(item.get("service") or ""),
                "enabled": module.boolean(item.get("enabled", True)),
                "on_calendar": [str(e) for e in item.get("on_calendar") or []],
            }
        )

    # Read-only checks come first: a bad schedule or a foreign unit stops everything.
    elapses = check_calendars(module, timers)
    installed = read_manifest(manifest_path)
    if installed is None:
        module.fail_json(
            msg=f"{manifest_path} is not a Fraisier unit manifest; move it away to start afresh"
        )
    foreign = [t for t in timers if t["service"] and t["service"] not in files]
    if foreign and (p["release_complete"] or not module.check_mode):
        known = show(module, [t["service"] for t in foreign])
        for timer in foreign:
            if known.get(timer["service"], {}).get("LoadState") in (None, "", "not-found"):
                module.fail_json(
                    msg=f"job {timer['job']}: systemd unit {timer['service']} not found on this"
                    f" host: ship it in the release as systemd/{timer['service']}, give the job"
                    " a script_path or command, or install it on the host first; nothing was"
                    " installed"
                )
    changes, diffs, pending = [], [], []
    for path, item in files.items():
        target = os.path.join(unit_dir, path)
        before = read_text(target)
        if before is not None and path not in installed:
            module.fail_json(
                msg=f"job {item.get('job')}: {target} exists and was not installed by Fraisier,"
                " which never touches such units: remove it, or name another unit in the job"
            )
        content = item.get("content")
        if content is None:
            src = item.get("src") or ""
            content = read_text(src) if src else None
            if content is None and module.check_mode:
                # A dry run does not unpack the release that ships the unit.
                pending.append(path)
                changes.append(path)
                continue
            if content is None:
                module.fail_json(
                    msg=f"job {item.get('job')}: unit file {src or '(no src)'} is missing on"
                    " the host; nothing was installed"
                )
        if content != before:
            changes.append(path)
            diffs.append(
                {
                    "before": before or "",
                    "after": content,
                    "before_header": target if before is not None else "/dev/null",
                    "after_header": target,
                }
            )
        item["_content"] = content
    stale = sorted(path for path in installed if path not in files)
    stale_timers = [unit_of(f) for f in stale if "/" not in f and f.endswith(".timer")]
    stale_services = [unit_of(f) for f in stale if "/" not in f and f.endswith(".service")]

    actions = []
    if not module.check_mode:
        # The union first: a run that dies halfway still knows every file it wrote.
        if changes or stale:
            write_manifest(manifest_path, set(installed) | set(files))
        for path in changes:
            target = os.path.join(unit_dir, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            write_atomic(target, files[path]["_content"])
        if stale_timers:
            run(module, ["systemctl", "disable", "--now", "--", *stale_timers])
        if stale_services:
            run(module, ["systemctl", "stop", "--", *stale_services], check=False)
        for path in stale:
            target = os.path.join(unit_dir, path)
            if os.path.lexists(target):
                os.unlink(target)
            if "/" in path:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(target))
        if changes or stale:
            run(module, ["systemctl", "daemon-reload"])
            write_manifest(manifest_path, files)
        elif not os.path.exists(manifest_path) and files:
            write_manifest(manifest_path, files)
    actions += [f"install {path}" for path in changes]
    actions += [f"remove {path}" for path in stale]

    states = show(module, [t["unit"] for t in timers])
    changed_units = {unit_of(path) for path in changes}
    to_enable, to_restart, to_disable = [], [], []
    for timer in timers:
        state = states.get(timer["unit"], {})
        enabled = state.get("UnitFileState") == "enabled"
        active = state.get("ActiveState") == "active"
        if timer["enabled"]:
            if not enabled or not active:
                to_enable.append(timer["unit"])
            elif timer["unit"] in changed_units:
                # A new schedule takes effect when the timer starts again.
                to_restart.append(timer["unit"])
        elif enabled or active:
            to_disable.append(timer["unit"])
    actions += [f"enable and start {u}" for u in to_enable]
    actions += [f"restart {u}" for u in to_restart]
    actions += [f"stop and disable {u}" for u in to_disable]
    if not module.check_mode:
        if to_enable:
            run(module, ["systemctl", "enable", "--now", "--", *to_enable])
        if to_restart:
            run(module, ["systemctl", "restart", "--", *to_restart])
        if to_disable:
            run(module, ["systemctl", "disable", "--now", "--", *to_disable])
        if to_enable or to_restart or to_disable:
            states = show(module, [t["unit"] for t in timers])

    report = {}
    for timer in timers:
        state = states.get(timer["unit"], {})
        calendar = earliest(elapses.get(e, "") for e in timer["on_calendar"])
        live = state.get("NextElapseUSecRealtime") or None
        stale_state = module.check_mode and (timer["unit"] in changed_units or not live)
        report[timer["unit"]] = {
            "job": timer["job"],
            "on_calendar": timer["on_calendar"],
            "enabled": timer["enabled"],
            # In a dry run, what systemd-analyze says the (new) schedule would give.
            "next_elapse": (calendar if stale_state else live) if timer["enabled"] else None,
            "next_elapse_source": "calendar" if stale_state else "systemd",
            "active": state.get("ActiveState"),
        }
    result = {
        "changed": bool(actions),
        "actions": actions,
        "timers": report,
        "installed": sorted(files),
        "removed": stale,
    }
    if pending:
        result["pending"] = pending
    if module._diff and diffs:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
