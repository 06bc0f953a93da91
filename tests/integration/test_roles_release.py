"""The fraise_release module on a real filesystem: unpack, switch, rollback, cleanup."""

import contextlib
import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from ansible.module_utils import basic

MODULE = Path(__file__).resolve().parents[2] / "roles/fraise_release/library/fraise_release.py"


def load_module():
    spec = importlib.util.spec_from_file_location("fraise_release_module", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FRAISE_RELEASE = load_module()


def run_module(check=False, **args):
    """Run the module in this process, fed its arguments as Ansible feeds them."""
    args["_ansible_check_mode"] = check
    basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode()
    # ansible-core 2.19 also wants the serialization profile its executor would pass.
    basic._ANSIBLE_PROFILE = "legacy"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        FRAISE_RELEASE.main()
    return json.loads(out.getvalue())


def make_archive(tmp_path, name, files):
    src = tmp_path / f"src-{name}"
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    return archive


@pytest.fixture
def app(tmp_path):
    """An application directory plus helpers bound to it."""

    class App:
        path = tmp_path / "app"

        def call(self, check=False, **args):
            return run_module(check=check, app_path=str(self.path), **args)

        def unpack(self, release_id, files=None, shared=()):
            archive = make_archive(tmp_path, release_id, files or {"VERSION": release_id})
            return self.call(
                state="unpack",
                release_id=release_id,
                archive=str(archive),
                shared_paths=list(shared),
            )

        def deploy(self, release_id, healthy=True, keep=5):
            """Unpack, switch pending, then confirm or roll back like fraise_api does."""
            self.unpack(release_id)
            self.call(state="switch", release_id=release_id, target=release_id)
            if healthy:
                return self.call(
                    state="switch",
                    release_id=release_id,
                    target=release_id,
                    confirm=True,
                    cleanup=True,
                    keep=keep,
                )
            return self.call(state="switch", failed=release_id, rollback=True)

        def current(self):
            link = self.path / "current"
            return os.readlink(link) if link.is_symlink() else None

        def history(self):
            path = self.path / ".fraisier/history"
            return path.read_text().split() if path.exists() else []

        def releases(self):
            return sorted(p.name for p in (self.path / "releases").iterdir())

    return App()


def test_unpack_is_idempotent_and_links_shared_paths(app):
    first = app.unpack("r1", {"VERSION": "1", "logs/seed": "x"}, shared=["logs", "conf/a.env"])
    assert first["changed"] and first["complete"]
    release = app.path / "releases/r1"
    assert (release / "logs").is_symlink()
    assert os.readlink(release / "logs") == str(app.path / "shared/logs")
    # The first release that ships a shared path seeds it.
    assert (app.path / "shared/logs/seed").read_text() == "x"
    assert (app.path / "shared/conf/a.env").is_dir()
    again = app.unpack("r1", {"VERSION": "changed"}, shared=["logs"])
    assert not again["changed"]
    assert (release / "VERSION").read_text() == "1"


def test_incomplete_release_is_unpacked_again(app):
    (app.path / "releases/r1").mkdir(parents=True)
    (app.path / "releases/r1/junk").write_text("left by a crash")
    result = app.unpack("r1")
    assert result["changed"]
    assert not (app.path / "releases/r1/junk").exists()


def test_shared_path_escaping_the_release_is_refused(app):
    result = app.unpack("r1", shared=["../etc"])
    assert result["failed"]
    assert "fraise_release_shared_paths" in result["msg"]


def test_switch_is_pending_until_confirmed(app):
    app.unpack("r1")
    result = app.call(state="switch", release_id="r1", target="r1")
    assert result["changed"] and result["pending"] == "r1"
    assert app.current() == "releases/r1"
    assert app.history() == []
    confirmed = app.call(state="switch", release_id="r1", target="r1", confirm=True)
    assert confirmed["changed"] and confirmed["pending"] is None
    assert app.history() == ["r1"]
    again = app.call(state="switch", release_id="r1", target="r1", confirm=True)
    assert not again["changed"]


def test_failed_release_rolls_back_to_the_last_good_one(app):
    app.deploy("r1")
    app.deploy("r2")
    result = app.deploy("r3", healthy=False)
    assert result["current"] == "r2"
    assert app.current() == "releases/r2"
    assert app.history() == ["r1", "r2"]
    assert (app.path / ".fraisier/failed").read_text().split() == ["r3"]
    assert not (app.path / ".fraisier/pending").exists()


def test_first_release_that_fails_leaves_no_current(app):
    result = app.deploy("r1", healthy=False)
    assert result["current"] is None
    assert not (app.path / "current").is_symlink()
    assert app.history() == []


def test_repeated_failures_never_delete_the_last_good_release(app):
    app.deploy("good", keep=1)
    for n in range(4):
        app.deploy(f"bad{n}", healthy=False, keep=1)
    app.call(state="cleanup", keep=1)
    assert app.current() == "releases/good"
    assert app.releases() == ["good"]
    assert app.history() == ["good"]


def test_cleanup_keeps_n_good_releases_and_drops_failed_ones(app):
    for n in range(1, 5):
        app.deploy(f"r{n}", keep=2)
    assert app.releases() == ["r3", "r4"]
    app.deploy("r5", healthy=False, keep=2)
    app.unpack("r6")
    result = app.call(state="cleanup", release_id="r6", keep=2)
    # r5 failed and is gone, r6 is being deployed and stays.
    assert result["removed"] == ["r5"]
    assert app.releases() == ["r3", "r4", "r6"]
    assert app.history() == ["r3", "r4"]


def test_cleanup_with_keep_one_still_keeps_the_rollback_target(app):
    app.deploy("r1", keep=1)
    app.deploy("r2", keep=1)
    assert app.releases() == ["r1", "r2"]
    assert app.call(state="inspect")["previous_good"] == "r1"


def test_rollback_goes_back_through_history(app):
    for n in range(1, 4):
        app.deploy(f"r{n}")
    state = app.call(state="inspect")
    assert state["previous_good"] == "r2"
    app.call(state="switch", target="r2", rollback=True)
    assert app.current() == "releases/r2"
    assert app.history() == ["r1", "r2"]
    state = app.call(state="inspect")
    assert state["previous_good"] == "r1"
    app.call(state="switch", target="r1", rollback=True)
    assert app.history() == ["r1"]
    assert app.call(state="inspect")["previous_good"] is None


def test_switch_to_incomplete_release_fails_without_change(app):
    app.deploy("r1")
    result = app.call(state="switch", target="nope")
    assert result["failed"]
    assert app.current() == "releases/r1"


def tree(path):
    return sorted(
        (str(p.relative_to(path)), os.readlink(p) if p.is_symlink() else p.stat().st_mtime_ns)
        for p in path.rglob("*")
    )


def test_check_mode_changes_nothing(app, tmp_path):
    app.deploy("r1", keep=1)
    app.deploy("r2", keep=1)
    app.deploy("r3", healthy=False, keep=1)
    archive = make_archive(tmp_path, "r4", {"VERSION": "4"})
    before = tree(app.path)
    unpack = app.call(check=True, state="unpack", release_id="r4", archive=str(archive))
    switch = app.call(check=True, state="switch", release_id="r2", target="r1", rollback=True)
    cleanup = app.call(check=True, state="cleanup", keep=1)
    assert unpack["changed"] and switch["changed"] and cleanup["changed"]
    assert cleanup["removed"] == ["r3"]
    assert tree(app.path) == before


def test_build_runs_once_in_the_release_and_reports_failures(app, tmp_path):
    archive = make_archive(tmp_path, "b1", {"VERSION": "b1"})
    args = dict(state="unpack", release_id="b1", archive=str(archive))
    preview = app.call(check=True, build="echo built >> BUILD_LOG", **args)
    assert preview["changed"] and not app.path.exists()
    first = app.call(build="echo built >> BUILD_LOG", **args)
    assert first["changed"] and first["build"]["rc"] == 0
    log = app.path / "releases" / "b1" / "BUILD_LOG"
    assert log.read_text() == "built\n"
    again = app.call(build="echo built >> BUILD_LOG", **args)
    assert not again["changed"]
    assert log.read_text() == "built\n"

    broken = make_archive(tmp_path, "b2", {"VERSION": "b2"})
    failed = app.call(
        state="unpack", release_id="b2", archive=str(broken), build="echo oops >&2; exit 3"
    )
    assert failed["failed"]
    assert failed["msg"] == "build of release b2 failed with exit code 3: oops"
    assert not (app.path / "releases" / "b2" / ".fraisier-built").exists()
