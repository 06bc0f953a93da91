"""Action of the fraise_release module: sends the release archive along with the call."""

from __future__ import annotations

import base64
import os

from ansible.errors import AnsibleActionFail
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

# An archive up to this size travels inside the module call: no temporary dir to make, no
# separate transfer, no clean-up round trip. Larger ones are sent as a file first.
INLINE_LIMIT = 1024 * 1024


class ActionModule(ActionBase):
    """Send O(src) to the host (inside the call when small) and unpack it in the same call."""

    # The temporary dir is made only when there is a large archive to send.
    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        """Run fraise_release, first sending the controller's archive when src is given."""
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp
        args = dict(self._task.args)
        src = args.pop("src", None)
        report = boolean(args.pop("report", False), strict=False)
        batch = args.pop("batch", None) or []
        try:
            if batch and args.get("state") == "switch":
                dropped = _dropped_hosts(batch, task_vars)
                if dropped:
                    # Checked here rather than in a task of its own: every host of the batch
                    # sees the same hosts missing, so none switches.
                    target = args.get("target") or args.get("release_id") or "the release"
                    raise AnsibleActionFail(
                        f"{', '.join(dropped)} failed before the switch: no host of this batch"
                        f" switches to {target}"
                    )
            # One call reads the state, unpacks and builds: sending the archive even when
            # the release turns out complete costs less than a separate look first. A dry
            # run sends nothing.
            if src and args.get("state") == "unpack" and not self._task.check_mode:
                if args.get("archive") or args.get("archive_content"):
                    raise AnsibleActionFail("fraise_release takes src or archive, not both")
                source = os.path.expanduser(str(src))
                if not os.path.isfile(source):
                    raise AnsibleActionFail(
                        f"release archive {source} is missing on the controller:"
                        " check fraise_release_archive"
                    )
                if os.path.getsize(source) <= INLINE_LIMIT:
                    with open(source, "rb") as handle:
                        args["archive_content"] = base64.b64encode(handle.read()).decode()
                else:
                    self._make_tmp_path()
                    remote = self._connection._shell.join_path(
                        self._connection._shell.tmpdir, os.path.basename(source)
                    )
                    self._transfer_file(source, remote)
                    self._fixup_perms2((self._connection._shell.tmpdir, remote))
                    args["archive"] = remote
            if args.get("state") == "unpack":
                # The hosts unpacking alongside: a later task can tell whether any of them
                # dropped out before the switch. Set before the call, so that a host whose
                # unpack fails records it too.
                result["batch"] = list(task_vars.get("ansible_play_batch") or [])
            result.update(
                self._execute_module(
                    module_name="fraise_release", module_args=args, task_vars=task_vars
                )
            )
            if report and not result.get("failed") and not self._task.check_mode:
                # What set_stats would publish, without a task of its own.
                # What the host says is live, not the release asked for: confirm may have
                # found another one current.
                live = result.get("current")
                result["ansible_stats"] = {
                    "data": {"fraisier_live": {task_vars.get("inventory_hostname"): live}},
                    "per_host": False,
                    "aggregate": True,
                }
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result


def _dropped_hosts(batch, task_vars):
    """Hosts of this host's batch that are no longer in the play, in play order.

    Ansible works out a host's variables when it queues that host's task. With more hosts
    than forks, a host queued after another failed its unpack recorded a batch without it;
    the failed host's own record still names the hosts queued with it. So the batch is
    every recorded batch that shares a host with this one.
    """
    alive = set(task_vars.get("ansible_play_batch") or [])
    everyone = list(task_vars.get("ansible_play_hosts_all") or [])
    hostvars = task_vars.get("hostvars") or {}
    records = []
    for host in everyone:
        state = hostvars[host].get("fraise_release_state") if host in hostvars else None
        if isinstance(state, dict) and state.get("batch"):
            records.append(set(state["batch"]))
    members = set(batch)
    grown = True
    while grown:
        grown = False
        for recorded in records:
            if recorded & members and not recorded <= members:
                members |= recorded
                grown = True
    ordered = everyone + sorted(members - set(everyone))
    return [h for h in ordered if h in members and h not in alive]
