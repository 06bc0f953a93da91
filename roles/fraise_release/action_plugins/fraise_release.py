"""Action of the fraise_release module: sends the release archive along with the call."""

from __future__ import annotations

import os

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    """Upload O(src) to the host's temporary dir and unpack it in the same module call."""

    # The temporary dir is made only when there is an archive to send.
    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        """Run fraise_release, first sending the controller's archive when src is given."""
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp
        args = dict(self._task.args)
        src = args.pop("src", None)
        try:
            # One call reads the state, unpacks and builds: sending the archive even when
            # the release turns out complete costs less than a separate look first. A dry
            # run sends nothing.
            if src and args.get("state") == "unpack" and not self._task.check_mode:
                if args.get("archive"):
                    raise AnsibleActionFail("fraise_release takes src or archive, not both")
                source = os.path.expanduser(str(src))
                if not os.path.isfile(source):
                    raise AnsibleActionFail(
                        f"release archive {source} is missing on the controller:"
                        " check fraise_release_archive"
                    )
                self._make_tmp_path()
                remote = self._connection._shell.join_path(
                    self._connection._shell.tmpdir, os.path.basename(source)
                )
                self._transfer_file(source, remote)
                self._fixup_perms2((self._connection._shell.tmpdir, remote))
                args["archive"] = remote
            result.update(
                self._execute_module(
                    module_name="fraise_release", module_args=args, task_vars=task_vars
                )
            )
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result
