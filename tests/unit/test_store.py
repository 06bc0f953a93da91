"""The store: schema, versions, read views, transitions (temporary SQLite files)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

import pytest

from fraisier.errors import NotFoundError, StoreError
from fraisier.store import (
    SCHEMA_VERSION,
    STATUSES,
    TERMINAL_STATUSES,
    Store,
    default_db_path,
)
from fraisier.store import schema as schema_module
from fraisier.store.views import VIEWS


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "fraisier.db"


@pytest.fixture
def store(db_path):
    with Store.open(db_path) as opened:
        yield opened


class Clock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime = datetime(2026, 11, 27, 3, 45, 1)):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def deploy(store: Store, fraise="api", environment="production", status="successful", **kw):
    """A deployment taken through running to `status`."""
    deployment_id = store.create_deployment(
        fraise=fraise, environment=environment, trigger=kw.pop("trigger", "cli"), **kw
    )
    if status != "queued":
        store.transition(deployment_id, "running", owner="host:1")
        if status != "running":
            store.transition(deployment_id, status)
    return deployment_id


# ---------------------------------------------------------------- paths and opening


def test_default_path_for_a_user_follows_xdg_state(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert default_db_path({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}) == (
        default_db_path.__globals__["Path"]("/x/state/fraisier/fraisier.db")
    )
    assert str(default_db_path({"HOME": "/home/u"})) == "/home/u/.local/state/fraisier/fraisier.db"


def test_default_path_for_root_and_override(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert str(default_db_path({"HOME": "/root"})) == "/var/lib/fraisier/fraisier.db"
    assert str(default_db_path({"FRAISIER_DB_PATH": "/tmp/f.db"})) == "/tmp/f.db"


def test_open_uses_environment_variables(tmp_path, monkeypatch):
    path = tmp_path / "from-env.db"
    monkeypatch.setenv("FRAISIER_DB_PATH", str(path))
    monkeypatch.delenv("FRAISIER_DATABASE_URL", raising=False)
    with Store.open() as store:
        assert store.path == path
    assert path.exists()
    url_path = tmp_path / "from-url.db"
    monkeypatch.setenv("FRAISIER_DATABASE_URL", f"sqlite:///{url_path}")
    with Store.open() as store:
        assert store.path == url_path


def test_schema_is_created_with_wal_version_and_views(store, db_path):
    assert db_path.exists()
    assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert store.schema_version == SCHEMA_VERSION == 1
    names = {row[0] for row in store.db.execute_sql("SELECT name FROM sqlite_master")}
    for table in (
        "tb_deployments",
        "tb_deployment_transitions",
        "tb_deployment_events",
        "tb_deployment_hosts",
        "tb_webhook_events",
        "tb_locks",
        "tb_schema_version",
    ):
        assert table in names
    assert set(VIEWS) <= names


def test_reopening_keeps_data(db_path):
    with Store.open(db_path) as store:
        deployment_id = deploy(store)
    with Store.open(db_path) as store:
        assert store.deployment(deployment_id)["status"] == "successful"
        assert store.schema_version == 1


def test_readonly_open_of_missing_file_creates_nothing(tmp_path):
    path = tmp_path / "nowhere" / "fraisier.db"
    with Store.open(path, readonly=True) as store:
        assert store.status() == []
        assert store.history() == []
        assert store.deployment(1) is None
        assert store.events(1) == []
        assert store.last_successful("api", "production") is None
        assert store.lock_holder("api", "production") is None
        with pytest.raises(StoreError, match="read-only"):
            store.create_deployment(fraise="a", environment="b", trigger="cli")
    assert not path.parent.exists()


def test_readonly_open_does_not_write(db_path):
    with Store.open(db_path) as store:
        deploy(store)
    before = {p.name: p.stat().st_mtime_ns for p in db_path.parent.iterdir()}
    with Store.open(db_path, readonly=True) as store:
        assert len(store.status()) == 1
        with pytest.raises(StoreError, match="read-only"):
            store.transition(1, "failed")
    assert db_path.stat().st_mtime_ns == before[db_path.name]


def test_not_a_database_is_a_store_error_naming_the_path(tmp_path):
    path = tmp_path / "fraisier.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    for readonly in (False, True):
        with pytest.raises(StoreError) as caught:
            Store.open(path, readonly=readonly)
        assert str(path) in str(caught.value)
        assert "FRAISIER_DB_PATH" in str(caught.value)


def test_unwritable_directory_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create its directory"):
        Store.open(blocker / "sub" / "fraisier.db")


def test_locked_beyond_busy_timeout_is_a_store_error(db_path, monkeypatch):
    with Store.open(db_path):
        pass
    monkeypatch.setattr("fraisier.store.api.BUSY_TIMEOUT_S", 0.1)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with Store.open(db_path) as store, pytest.raises(StoreError) as caught:
            store.create_deployment(fraise="a", environment="b", trigger="cli")
        assert str(db_path) in str(caught.value) and "locked" in str(caught.value)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


# ---------------------------------------------------------------- versions and migrations


def test_newer_schema_is_refused(db_path):
    with Store.open(db_path) as store:
        store.db.execute_sql("INSERT INTO tb_schema_version (version, applied_at) VALUES (7, '')")
    for readonly in (False, True):
        with pytest.raises(StoreError) as caught:
            Store.open(db_path, readonly=readonly)
        assert str(caught.value) == (
            f"{db_path}: schema version 7 is newer than this Fraisier knows (1); upgrade Fraisier"
        )


def test_version_zero_file_is_created_in_place(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE unrelated (x INTEGER)")
    con.commit()
    con.close()
    with Store.open(path, readonly=True) as store:
        assert store.status() == []
    with Store.open(path) as store:
        assert store.schema_version == 1
        deploy(store)
        assert len(store.history()) == 1


def test_older_file_is_migrated_step_by_step(db_path, monkeypatch):
    with Store.open(db_path) as store:
        deploy(store)
    ran = []

    def step_2(db, models):
        ran.append(2)
        db.execute_sql("ALTER TABLE tb_deployments ADD COLUMN ticket VARCHAR(32)")

    def step_3(db, models):
        ran.append(3)
        db.execute_sql("UPDATE tb_deployments SET ticket = 'OPS-' || id")

    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 3)
    monkeypatch.setitem(schema_module.MIGRATIONS, 2, step_2)
    monkeypatch.setitem(schema_module.MIGRATIONS, 3, step_3)
    with pytest.raises(StoreError, match="older than this Fraisier"):
        Store.open(db_path, readonly=True)
    with Store.open(db_path) as store:
        assert ran == [2, 3]
        assert store.schema_version == 3
        assert store.db.execute_sql("SELECT ticket FROM tb_deployments").fetchone()[0] == "OPS-1"
        versions = [r[0] for r in store.db.execute_sql("SELECT version FROM tb_schema_version")]
        assert sorted(versions) == [1, 2, 3]
        assert store.status()[0]["status"] == "successful"
    with Store.open(db_path):
        assert ran == [2, 3]


def test_failed_migration_step_leaves_the_file_at_its_version(db_path, monkeypatch):
    with Store.open(db_path) as store:
        deploy(store)

    def step_2(db, models):
        db.execute_sql("ALTER TABLE tb_deployments ADD COLUMN ticket VARCHAR(32)")
        db.execute_sql("UPDATE no_such_table SET x = 1")

    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(schema_module.MIGRATIONS, 2, step_2)
    with pytest.raises(StoreError, match=str(db_path)):
        Store.open(db_path)
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 1)
    with Store.open(db_path) as store:
        assert store.schema_version == 1
        columns = [r[1] for r in store.db.execute_sql("PRAGMA table_info(tb_deployments)")]
        assert "ticket" not in columns
        # The views were dropped inside the failed step's transaction: they are back.
        assert len(store.status()) == 1


def test_missing_migration_step_is_reported(db_path, monkeypatch):
    with Store.open(db_path):
        pass
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 2)
    monkeypatch.delitem(schema_module.MIGRATIONS, 2, raising=False)
    with pytest.raises(StoreError, match="no migration step to schema version 2"):
        Store.open(db_path)


# ---------------------------------------------------------------- read views


def test_status_picks_latest_live_deployment_per_pair(store):
    deploy(store, "api", "production", "successful", commit="a1")
    deploy(store, "api", "production", "failed", commit="a2")
    deploy(store, "api", "staging", "successful", commit="s1")
    deploy(store, "web", "production", "successful", commit="w1")
    deploy(store, "web", "production", "successful", commit="w-dry", dry_run=True)
    deploy(store, "etl", "production", "successful", commit="only-dry", dry_run=True)
    queued = deploy(store, "web", "staging", "queued", commit="q1")

    rows = store.status()
    assert [(r["fraise"], r["environment"]) for r in rows] == [
        ("api", "production"),
        ("api", "staging"),
        ("web", "production"),
        ("web", "staging"),
    ]
    by_pair = {(r["fraise"], r["environment"]): r for r in rows}
    assert by_pair["api", "production"]["status"] == "failed"
    assert by_pair["api", "production"]["commit"] == "a2"
    assert by_pair["web", "production"]["commit"] == "w1"
    assert by_pair["web", "staging"] == {
        "fraise": "web",
        "environment": "staging",
        "status": "queued",
        "commit": "q1",
        "branch": None,
        "deployment_id": queued,
        "started_at": None,
        "completed_at": None,
    }
    assert [r["environment"] for r in store.status(fraise="api")] == ["production", "staging"]
    assert [r["fraise"] for r in store.status(environment="production")] == ["api", "web"]
    assert store.status(fraise="api", environment="staging")[0]["commit"] == "s1"
    assert store.status(fraise="nope") == []


def test_status_with_many_pairs_and_interleaved_ids(store):
    expected = {}
    for round_ in range(5):
        for fraise in ("a", "b", "c", "d"):
            for environment in ("dev", "prod", "qa"):
                commit = f"{fraise}{environment}{round_}"
                deployment_id = deploy(store, fraise, environment, commit=commit)
                expected[fraise, environment] = (deployment_id, commit)
    rows = store.status()
    assert len(rows) == 12
    for row in rows:
        assert (row["deployment_id"], row["commit"]) == expected[row["fraise"], row["environment"]]


def test_history_order_limit_and_filters(store):
    ids = [
        deploy(store, "api", "production", "successful"),
        deploy(store, "api", "staging", "failed"),
        deploy(store, "web", "production", "successful", dry_run=True),
        deploy(store, "api", "production", "failed"),
    ]
    rows = store.history()
    assert [r["id"] for r in rows] == ids[::-1]
    assert set(rows[0]) == {
        "id",
        "fraise",
        "environment",
        "status",
        "trigger",
        "commit",
        "branch",
        "dry_run",
        "started_at",
        "completed_at",
        "error",
    }
    assert rows[1]["dry_run"] is True and rows[0]["dry_run"] is False
    assert [r["id"] for r in store.history(limit=2)] == [ids[3], ids[2]]
    assert [r["id"] for r in store.history("api")] == [ids[3], ids[1], ids[0]]
    assert [r["id"] for r in store.history("api", "production")] == [ids[3], ids[0]]
    assert [r["id"] for r in store.history(status="failed")] == [ids[3], ids[1]]
    assert [r["id"] for r in store.history(environment="production", status="failed")] == [ids[3]]
    assert len(store.history(limit=None)) == 4


def test_last_successful_skips_dry_runs_and_failures(store):
    good = deploy(store, commit="good")
    deploy(store, commit="dry", dry_run=True)
    deploy(store, status="failed", commit="bad")
    deploy(store, "api", "staging", commit="elsewhere")
    row = store.last_successful("api", "production")
    assert row["id"] == good and row["commit"] == "good"
    assert store.last_successful("api", "nowhere") is None


def test_timestamps_are_iso_utc_to_the_second(store):
    clock = Clock()
    store.clock = clock
    deployment_id = store.create_deployment(fraise="a", environment="b", trigger="cli")
    clock.tick(2.5)
    store.transition(deployment_id, "running", owner="h:1")
    clock.tick(60)
    store.transition(deployment_id, "successful")
    row = store.deployment(deployment_id)
    assert row["created_at"] == "2026-11-27T03:45:01Z"
    assert row["started_at"] == "2026-11-27T03:45:03Z"
    assert row["completed_at"] == "2026-11-27T03:46:03Z"
    assert [t["created_at"] for t in row["transitions"]] == [
        "2026-11-27T03:45:01Z",
        "2026-11-27T03:45:03Z",
        "2026-11-27T03:46:03Z",
    ]


# ---------------------------------------------------------------- transitions


def test_transitions_set_times_and_are_recorded(store):
    deployment_id = store.create_deployment(
        fraise="api",
        environment="production",
        trigger="cli",
        commit="abc",
        branch="main",
        requested_by="alice",
        commit_message="Fix it",
        options={"limit": ["web1"], "force": True},
    )
    row = store.deployment(deployment_id)
    assert row["status"] == "queued" and row["started_at"] is None
    assert row["options"] == {"force": True, "limit": ["web1"]}
    store.transition(deployment_id, "running", owner="host:42")
    row = store.deployment(deployment_id)
    assert row["started_at"] is not None and row["completed_at"] is None
    assert row["owner"] == "host:42"
    store.update_deployment(deployment_id, release_id="20261127034501", commit="def", pid=77)
    assert store.deployment(deployment_id)["owner"].endswith(":77")
    store.transition(deployment_id, "failed", error="1 host failed: web1", detail="exit 2")
    row = store.deployment(deployment_id)
    assert row["completed_at"] is not None
    assert row["error"] == "1 host failed: web1"
    assert (row["release_id"], row["commit"]) == ("20261127034501", "def")
    assert [(t["from_status"], t["to_status"], t["detail"]) for t in row["transitions"]] == [
        (None, "queued", None),
        ("queued", "running", None),
        ("running", "failed", "exit 2"),
    ]


def test_terminal_status_is_final(store):
    deployment_id = deploy(store, status="successful")
    for status in STATUSES:
        with pytest.raises(StoreError, match="is successful; it cannot become"):
            store.transition(deployment_id, status)
    assert len(store.deployment(deployment_id)["transitions"]) == 3


def test_illegal_and_unknown_transitions(store):
    queued = store.create_deployment(fraise="a", environment="b", trigger="cli")
    with pytest.raises(StoreError, match="cannot become successful"):
        store.transition(queued, "successful")
    with pytest.raises(StoreError, match="unknown deployment status 'done'"):
        store.transition(queued, "done")
    with pytest.raises(StoreError, match="cannot set status"):
        store.update_deployment(queued, status="running")
    with pytest.raises(NotFoundError, match="deployment 999"):
        store.transition(999, "running")
    store.transition(queued, "canceled")
    assert store.deployment(queued)["status"] == "canceled"
    assert "canceled" in TERMINAL_STATUSES


def test_created_running_gets_started_at(store):
    deployment_id = store.create_deployment(
        fraise="a", environment="b", trigger="cli", status="running", owner="h:1"
    )
    row = store.deployment(deployment_id)
    assert row["started_at"] is not None and row["owner"] == "h:1"


def test_host_results(store):
    deployment_id = deploy(store)
    store.record_host_results(
        deployment_id,
        {
            "web2": {"ok": 3, "changed": 0},
            "web1": {"ok": 5, "changed": 2, "skipped": 1},
            "db1": {"ok": 1, "failures": 1, "ignored": 1},
            "db2": {"dark": 1},
        },
    )
    hosts = store.deployment(deployment_id)["hosts"]
    assert [(h["host"], h["status"]) for h in hosts] == [
        ("db1", "failed"),
        ("db2", "unreachable"),
        ("web1", "changed"),
        ("web2", "ok"),
    ]
    assert hosts[2] == {
        "host": "web1",
        "ok": 5,
        "changed": 2,
        "failures": 0,
        "unreachable": 0,
        "skipped": 1,
        "rescued": 0,
        "ignored": 0,
        "status": "changed",
    }
    store.record_host_results(deployment_id, {"web2": {"ok": 4, "changed": 1}})
    assert [h["ok"] for h in store.hosts(deployment_id)] == [1, 0, 5, 4]


def test_readonly_open_of_a_path_with_uri_characters(tmp_path):
    path = tmp_path / "odd ?#% name" / "fraisier.db"
    with Store.open(path) as store:
        deploy(store)
    with Store.open(path, readonly=True) as store:
        assert len(store.history()) == 1


def test_opening_many_stores_leaves_no_references_behind(tmp_path):
    from fraisier.store import models

    Store.open(tmp_path / "first.db").close()
    before = len(models.Deployment._meta.backrefs), len(models.Deployment._meta.model_backrefs)
    for n in range(20):
        Store.open(tmp_path / f"{n}.db").close()
    after = len(models.Deployment._meta.backrefs), len(models.Deployment._meta.model_backrefs)
    assert after == before


def test_deployment_by_release_finds_the_latest_maker_of_a_release(store):
    first = store.create_deployment(
        fraise="api", environment="prod", trigger="cli", commit="a" * 40
    )
    store.transition(first, "running", release_id="r1")
    store.transition(first, "successful")
    other = store.create_deployment(fraise="api", environment="qa", trigger="cli", commit="b" * 40)
    store.transition(other, "running", release_id="r1")
    assert store.deployment_by_release("api", "prod", "r1")["commit"] == "a" * 40
    assert store.deployment_by_release("api", "qa", "r1")["id"] == other
    assert store.deployment_by_release("api", "prod", "r2") is None
