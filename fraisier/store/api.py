"""The Store: opening, schema checks, the write side (tb_*) and the read side (v_* views)."""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import peewee as pw

from fraisier.errors import LockedError, NotFoundError, StoreError
from fraisier.store import schema
from fraisier.store.constants import (
    ACTIVE_STATUSES,
    HOST_STAT_KEYS,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUPERSEDED,
    TERMINAL_STATUSES,
    TRANSITIONS,
)
from fraisier.store.models import BoundModels, db_timestamp, iso_utc, parse_ts, utcnow
from fraisier.store.writer import EVENT_COLUMNS, EventWriter

BUSY_TIMEOUT_S = 5.0
# WAL size (4 KiB pages) at which a writer checkpoints itself when checkpoints are deferred.
DEFERRED_CHECKPOINT_PAGES = 8000
ROOT_DB_PATH = Path("/var/lib/fraisier/fraisier.db")

STATUS_KEYS = (
    "fraise",
    "environment",
    "status",
    "commit",
    "branch",
    "deployment_id",
    "started_at",
    "completed_at",
)
HISTORY_KEYS = (
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
)
DETAIL_KEYS = (
    *HISTORY_KEYS,
    "release_id",
    "requested_by",
    "commit_message",
    "options",
    "created_at",
    "owner",
    "heartbeat_at",
    "webhook_event_id",
    "cancel_requested_at",
)
EVENT_KEYS = EVENT_COLUMNS[1:]
# Column order of the prepared webhook rows (see Store._webhook_row).
WEBHOOK_COLUMNS = (
    "provider",
    "delivery_id",
    "event_type",
    "ref",
    "branch",
    "commit",
    "repository",
    "pusher",
    "payload_sha256",
    "outcome",
    "reason",
    "received_at",
)
# Column order of a deployment queued by a webhook (see Store.enqueue_from_webhook).
QUEUED_COLUMNS = (
    "fraise",
    "environment",
    "status",
    "trigger",
    "commit",
    "branch",
    "dry_run",
    "requested_by",
    "commit_message",
    "webhook_event_id",
    "options",
    "created_at",
)
# Columns a caller may set through update_deployment / transition(**fields).
UPDATABLE = frozenset(
    {
        "commit",
        "branch",
        "release_id",
        "requested_by",
        "commit_message",
        "options",
        "error",
        "owner",
        "heartbeat_at",
    }
)
_TIME_KEYS = frozenset(
    {
        "started_at",
        "completed_at",
        "created_at",
        "claimed_at",
        "heartbeat_at",
        "cancel_requested_at",
        "acquired_at",
        "expires_at",
        "received_at",
    }
)


def default_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the store lives: FRAISIER_DB_PATH, else /var/lib for root, else XDG state."""
    env = os.environ if environ is None else environ
    if env.get("FRAISIER_DB_PATH"):
        return Path(env["FRAISIER_DB_PATH"]).expanduser()
    if os.geteuid() == 0:
        return ROOT_DB_PATH
    state = env.get("XDG_STATE_HOME") or ""
    if not state:
        home = env.get("HOME") or str(Path.home())
        state = str(Path(home) / ".local" / "state")
    return Path(state) / "fraisier" / "fraisier.db"


def owner_id() -> str:
    """The owner string of this process, as stored in tb_deployments.owner: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def local_process_alive(owner: str) -> bool:
    """Whether the owner ("hostname:pid") still runs; owners on other hosts count as alive."""
    host, _, pid_text = (owner or "").rpartition(":")
    if not pid_text.isdigit():
        return False
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Enqueued(list):
    """Deployment ids queued from one webhook delivery, with the delivery's row id.

    `duplicate` is True when the delivery had been recorded already: nothing was queued.
    """

    def __init__(self, ids: Iterable[int], *, webhook_event_id: int, duplicate: bool):
        super().__init__(ids)
        self.webhook_event_id = webhook_event_id
        self.duplicate = duplicate


_T = TypeVar("_T")
# A webhook row's values in WEBHOOK_COLUMNS order, from a dict that has them all.
_webhook_values = operator.itemgetter(*WEBHOOK_COLUMNS)
# What _errors() turns into StoreError (peewee's IntegrityError excepted).
_DRIVER_ERRORS = (pw.OperationalError, pw.DatabaseError, pw.InterfaceError, sqlite3.Error)
# How one webhook write of a batch fails without failing the others.
_WRITE_ERRORS = (StoreError, pw.DatabaseError, sqlite3.Error)


class BatchedWriteError(Exception):
    """What run_webhook_writes gives for a write of a batch that failed: its error."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _PeeweeCursor:
    """The execute/executemany of a sqlite3 connection, over a peewee database."""

    __slots__ = ("db",)

    def __init__(self, db: pw.Database):
        self.db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.db.execute_sql(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        return self.db.cursor().executemany(sql, rows)


class _SharedWriteConnection:
    """One SQLite connection per process for the webhook write path, shared by its threads.

    SQLite empties a connection's page cache whenever another connection has written since
    its last transaction. With a connection per thread, as peewee keeps them, every delivery
    found its cache stale and read each index page it touched again; one connection shared
    by the threads of a process stays warm from one of its writes to the next. The lock
    makes the threads take turns, which the write transaction would make them do anyway.
    """

    def __init__(self, path: Path):
        self._path = str(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self.autocheckpoint_pages: int | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            # A connection inherited across fork() is left alone, never used or closed here:
            # its locks belong to the parent.
            conn = sqlite3.connect(
                self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=normal")
            conn.execute("PRAGMA foreign_keys=1")
            if self.autocheckpoint_pages is not None:
                conn.execute(f"PRAGMA wal_autocheckpoint={int(self.autocheckpoint_pages)}")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """work(connection) in BEGIN IMMEDIATE ... COMMIT, one thread at a time."""
        # A plain call rather than a context manager: this runs for every delivery.
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    def close(self) -> None:
        """Close the connection when this process opened it."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _hint(message: str) -> str:
    text = message.lower()
    if "locked" in text or "busy" in text:
        return (
            f"another process kept the database locked for more than {BUSY_TIMEOUT_S:g} s; "
            "retry when it is done"
        )
    if "not a database" in text or "encrypted" in text or "malformed" in text:
        return "it is not a usable SQLite database; move it away or set FRAISIER_DB_PATH elsewhere"
    if "unable to open" in text or "readonly" in text or "read-only" in text:
        return (
            "check the permissions of the file and of its directory, or set FRAISIER_DB_PATH "
            "to a writable place"
        )
    return "check the database, or set FRAISIER_DB_PATH / FRAISIER_DATABASE_URL elsewhere"


class Store:
    """The deployment store. Open it with Store.open(); use it as a context manager."""

    def __init__(
        self,
        db: pw.Database | None,
        *,
        label: str,
        readonly: bool,
        path: Path | None = None,
    ):
        self.db = db
        self.label = label
        self.path = path
        self.readonly = readonly
        self.models = BoundModels(db) if db is not None else None
        # Tests move time forward by replacing this; it returns naive UTC datetimes.
        self.clock: Callable[[], datetime] = utcnow
        # Set when a read-only open found no Fraisier schema: every read is empty.
        self._empty = db is None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str] | None = None,
        *,
        readonly: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> Store:
        """Open the store at a path or database URL (None: FRAISIER_DATABASE_URL, FRAISIER_DB_PATH,
        the default path); create or migrate its schema unless read-only."""
        env = os.environ if environ is None else environ
        if location is None:
            location = env.get("FRAISIER_DATABASE_URL") or default_db_path(env)
        text = os.fspath(location)
        if "://" in text:
            scheme, _, rest = text.partition("://")
            if scheme in ("sqlite", "file"):
                # sqlite:///relative.db and sqlite:////absolute.db, as peewee reads them.
                rest = rest[1:] if rest.startswith("/") else rest
                return cls._open_sqlite(Path(rest.split("?")[0]), readonly=readonly)
            return cls._open_url(text, readonly=readonly)
        return cls._open_sqlite(Path(text).expanduser(), readonly=readonly)

    @classmethod
    def _open_sqlite(cls, path: Path, *, readonly: bool) -> Store:
        label = str(path)
        if readonly:
            if not path.exists() or (path.is_file() and path.stat().st_size == 0):
                return cls(None, label=label, readonly=True, path=path)
            db = pw.SqliteDatabase(
                f"file:{quote(str(path.absolute()))}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                pragmas={"query_only": 1},
            )
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"{label}: cannot create its directory ({exc.strerror}); create "
                    f"{path.parent} with write access, or set FRAISIER_DB_PATH elsewhere"
                ) from exc
            db = pw.SqliteDatabase(
                str(path),
                timeout=BUSY_TIMEOUT_S,
                # WAL lets readers run while a deployment writes events; NORMAL sync is
                # durable across application crashes in WAL mode and much faster than FULL.
                pragmas={"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1},
            )
        store = cls(db, label=label, readonly=readonly, path=path)
        store._prepare()
        return store

    @classmethod
    def _open_url(cls, url: str, *, readonly: bool) -> Store:
        from playhouse import db_url

        safe = url.split("@")[-1] if "@" in url else url
        try:
            db = db_url.connect(url)
        except (RuntimeError, ValueError, ImportError, pw.ImproperlyConfigured) as exc:
            raise StoreError(
                f"{safe}: cannot use this database URL ({exc}); "
                "check FRAISIER_DATABASE_URL and its driver"
            ) from exc
        store = cls(db, label=safe, readonly=readonly)
        store._prepare()
        return store

    def _prepare(self) -> None:
        """Check the schema version; create or migrate it when writable."""
        with self._errors():
            version = schema.read_version(self.db)
            known = schema.SCHEMA_VERSION
            if version > known:
                raise StoreError(
                    f"{self.label}: schema version {version} is newer than this Fraisier "
                    f"knows ({known}); upgrade Fraisier"
                )
            if version == known:
                if not self.readonly:
                    self._refresh_statistics()
                return
            if self.readonly:
                if version == 0:
                    self._empty = True
                    return
                raise StoreError(
                    f"{self.label}: schema version {version} is older than this Fraisier's "
                    f"({known}); open it once for writing (any deploy, or the webhook server) "
                    "to migrate it"
                )
            try:
                reached = schema.migrate(self.db, self.models, transaction=self._write)
            except LookupError as exc:
                raise StoreError(
                    f"{self.label}: cannot migrate from schema version {version} ({exc}); "
                    "upgrade Fraisier"
                ) from exc
            if reached > known:
                raise StoreError(
                    f"{self.label}: schema version {reached} is newer than this Fraisier "
                    f"knows ({known}); upgrade Fraisier"
                )

    def close(self) -> None:
        """Close this thread's connection (and the shared webhook connection, if open)."""
        if self.db is not None and not self.db.is_closed():
            self.db.close()
        shared = self.__dict__.get("_shared_write")
        if shared is not None:
            shared.close()

    def _close_thread_connection(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _refresh_statistics(self) -> None:
        """Run optimize() when tb_deployments has doubled since the planner last counted it.

        v_fraise_status relies on the statistics to skip through the index; refreshing them
        as the table doubles costs a few ms a logarithmic number of times.
        """
        if not self.is_sqlite:
            return
        rows = self.db.execute_sql("SELECT MAX(id) FROM tb_deployments").fetchone()[0] or 0
        if rows < 1000:
            return
        counted = 0
        if self.db.table_exists("sqlite_stat1"):
            stat = self.db.execute_sql(
                "SELECT stat FROM sqlite_stat1 WHERE tbl = 'tb_deployments' LIMIT 1"
            ).fetchone()
            counted = int(stat[0].split()[0]) if stat and stat[0] else 0
        if rows > 2 * counted:
            self.optimize()

    def optimize(self) -> None:
        """Refresh the query planner's statistics; cheap (bounded sampling), worth a call when a
        worker or the webhook server starts: v_fraise_status is 60x faster with them."""
        if self.readonly or self.db is None:
            raise StoreError(f"{self.label}: the store was opened read-only; cannot optimize it")
        with self._errors():
            if self.is_sqlite:
                self.db.execute_sql("PRAGMA analysis_limit=1000")
            self.db.execute_sql("ANALYZE")

    def defer_checkpoints(self, pages: int = DEFERRED_CHECKPOINT_PAGES) -> None:
        """Leave WAL checkpoints to a background caller of checkpoint(): this store's
        connections then only checkpoint themselves once the WAL holds `pages` pages."""
        if self.readonly or not self.is_sqlite:
            return
        # A checkpoint run by a committing writer happens inside its write turn and costs
        # two fsyncs, so every other writer waits for them; with SQLite's default (1,000
        # pages, about 100 webhook deliveries) that was half the cost of a delivery. The
        # fallback keeps the WAL bounded should the background checkpoints stop.
        with self._errors():
            self.db.pragma("wal_autocheckpoint", int(pages), permanent=True)
        if self._shared_write is not None:
            self._shared_write.autocheckpoint_pages = int(pages)

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL frames into the database without waiting for readers or
        writers (a PASSIVE checkpoint); (frames in the WAL, frames copied), (0, 0) if not WAL."""
        if self.readonly or not self.is_sqlite:
            return 0, 0
        with self._errors():
            row = self.db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if not row or row[1] < 0:
            return 0, 0
        return int(row[1]), int(row[2])

    @property
    def is_sqlite(self) -> bool:
        """Whether the backend is SQLite."""
        return isinstance(self.db, pw.SqliteDatabase)

    @property
    def schema_version(self) -> int:
        """The schema version of the open database (0 when it has none)."""
        if self.db is None:
            return 0
        with self._errors():
            return schema.read_version(self.db)

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn driver errors into StoreError naming the database and what to do."""
        try:
            yield
        except pw.IntegrityError:
            raise
        except (pw.OperationalError, pw.DatabaseError, pw.InterfaceError, sqlite3.Error) as exc:
            raise StoreError(f"{self.label}: {exc}; {_hint(str(exc))}") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction; on SQLite BEGIN IMMEDIATE, so read-then-write is atomic."""
        if self.readonly or self.db is None:
            raise StoreError(
                f"{self.label}: the store was opened read-only; open it for writing to change it"
            )
        with self._errors():
            txn = self.db.atomic("IMMEDIATE") if self.is_sqlite else self.db.atomic()
            with txn:
                yield

    def _ts(self, value: datetime | None) -> object:
        return db_timestamp(self.db, value)

    def _now(self) -> datetime:
        return self.clock()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self._empty:
            return []
        with self._errors():
            cursor = self.db.execute_sql(sql.replace("?", self.db.param), tuple(params))
            names = [col[0] for col in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    @staticmethod
    def _where(filters: Iterable[tuple[str, Any]]) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for column, value in filters:
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    @staticmethod
    def _shape(row: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
        out = {}
        for key in keys:
            value = row.get(key)
            if key in _TIME_KEYS:
                value = iso_utc(value)
            elif key in ("dry_run", "changed", "failed"):
                value = bool(value)
            elif key == "options":
                value = json.loads(value) if value else {}
            out[key] = value
        return out

    def _require(self, deployment_id: int) -> str:
        """The current status of a deployment, or NotFoundError."""
        D = self.models.Deployment
        row = D.select(D.status).where(D.id == deployment_id).tuples().first()
        if row is None:
            raise NotFoundError(
                f"deployment {deployment_id} does not exist in {self.label}; "
                "see `fraisier history` for the ids"
            )
        return row[0]

    def _add_transition(
        self, deployment_id: int, from_status: str | None, to_status: str, detail: str | None
    ) -> None:
        self.models.DeploymentTransition.insert(
            deployment=deployment_id,
            from_status=from_status,
            to_status=to_status,
            detail=detail,
            created_at=self._now(),
        ).execute()

    # ------------------------------------------------------------------ read side

    def status(self, fraise: str | None = None, environment: str | None = None) -> list[dict]:
        """Latest non-dry-run deployment per fraise and environment, sorted by both."""
        where, params = self._where([("fraise", fraise), ("environment", environment)])
        rows = self._query(
            f"SELECT * FROM v_fraise_status{where} ORDER BY fraise, environment", params
        )
        return [self._shape(row, STATUS_KEYS) for row in rows]

    def history(
        self,
        fraise: str | None = None,
        environment: str | None = None,
        *,
        limit: int | None = 20,
        status: str | None = None,
    ) -> list[dict]:
        """Deployments, newest first, optionally filtered; at most `limit` of them."""
        where, params = self._where(
            [("fraise", fraise), ("environment", environment), ("status", status)]
        )
        sql = f"SELECT * FROM v_deployment_history{where} ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [self._shape(row, HISTORY_KEYS) for row in self._query(sql, params)]

    def deployment(self, deployment_id: int) -> dict | None:
        """One deployment with its per-host results and its transitions, or None."""
        rows = self._query("SELECT * FROM v_deployment_history WHERE id = ?", [deployment_id])
        if not rows:
            return None
        out = self._shape(rows[0], DETAIL_KEYS)
        out["hosts"] = self.hosts(deployment_id)
        out["transitions"] = [
            {
                "from_status": row["from_status"],
                "to_status": row["to_status"],
                "detail": row["detail"],
                "created_at": iso_utc(row["created_at"]),
            }
            for row in self._query(
                "SELECT * FROM v_deployment_transitions WHERE deployment_id = ? ORDER BY id",
                [deployment_id],
            )
        ]
        return out

    def hosts(self, deployment_id: int) -> list[dict]:
        """Per-host results of a deployment (from playbook_on_stats), sorted by host."""
        rows = self._query(
            "SELECT * FROM v_deployment_hosts WHERE deployment_id = ? ORDER BY host",
            [deployment_id],
        )
        keys = ("host", *HOST_STAT_KEYS, "status")
        return [{key: row[key] for key in keys} for row in rows]

    def events(
        self, deployment_id: int, *, after_seq: int = 0, limit: int | None = None
    ) -> list[dict]:
        """Runner events of a deployment in order, those after `after_seq` (for following)."""
        sql = "SELECT * FROM v_deployment_events WHERE deployment_id = ? AND seq > ? ORDER BY seq"
        params: list[Any] = [deployment_id, after_seq]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        out = []
        for row in self._query(sql, params):
            item = self._shape(row, EVENT_KEYS)
            if item["result"]:
                item["result"] = json.loads(item["result"])
            out.append(item)
        return out

    def last_successful(self, fraise: str, environment: str) -> dict | None:
        """The latest successful non-dry-run deployment of a fraise in an environment."""
        rows = self._query(
            "SELECT * FROM v_deployment_history WHERE fraise = ? AND environment = ? "
            "AND status = 'successful' AND NOT dry_run ORDER BY id DESC LIMIT 1",
            [fraise, environment],
        )
        return self._shape(rows[0], DETAIL_KEYS) if rows else None

    def deployment_by_release(self, fraise: str, environment: str, release_id: str) -> dict | None:
        """The latest deployment that made release `release_id` of a fraise+environment."""
        rows = self._query(
            "SELECT * FROM v_deployment_history WHERE fraise = ? AND environment = ? "
            "AND release_id = ? ORDER BY id DESC LIMIT 1",
            [fraise, environment, release_id],
        )
        return self._shape(rows[0], DETAIL_KEYS) if rows else None

    def webhook_events(self, *, limit: int = 50) -> list[dict]:
        """Recorded webhook deliveries, newest first."""
        rows = self._query("SELECT * FROM v_webhook_events ORDER BY id DESC LIMIT ?", [limit])
        return [{k: iso_utc(v) if k in _TIME_KEYS else v for k, v in r.items()} for r in rows]

    def lock_holder(self, fraise: str, environment: str) -> dict | None:
        """The live (unexpired) lock of a fraise and environment, or None."""
        rows = self._query(
            "SELECT * FROM v_locks WHERE fraise = ? AND environment = ?", [fraise, environment]
        )
        if not rows or parse_ts(rows[0]["expires_at"]) <= self._now():
            return None
        row = rows[0]
        return {k: iso_utc(v) if k in _TIME_KEYS else v for k, v in row.items()}

    # ------------------------------------------------------------------ write side

    def create_deployment(
        self,
        *,
        fraise: str,
        environment: str,
        trigger: str,
        commit: str | None = None,
        branch: str | None = None,
        dry_run: bool = False,
        status: str = QUEUED,
        requested_by: str | None = None,
        commit_message: str | None = None,
        options: Mapping[str, Any] | None = None,
        webhook_event_id: int | None = None,
        owner: str | None = None,
    ) -> int:
        """Record a new deployment (queued by default) and its first transition; return its id."""
        if status not in STATUSES:
            raise StoreError(f"unknown deployment status {status!r}; use one of {STATUSES}")
        with self._write():
            return self._create(
                fraise=fraise,
                environment=environment,
                trigger=trigger,
                commit=commit,
                branch=branch,
                dry_run=dry_run,
                status=status,
                requested_by=requested_by,
                commit_message=commit_message,
                options=options,
                webhook_event_id=webhook_event_id,
                owner=owner,
            )

    def _create(self, *, status: str, options: Mapping[str, Any] | None, **values: Any) -> int:
        now = self._now()
        deployment_id = self.models.Deployment.insert(
            status=status,
            options=json.dumps(dict(options), sort_keys=True, default=str) if options else None,
            created_at=now,
            started_at=now if status != QUEUED else None,
            completed_at=now if status in TERMINAL_STATUSES else None,
            **values,
        ).execute()
        self._add_transition(deployment_id, None, status, None)
        return int(deployment_id)

    def _encode_fields(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        if "pid" in fields:
            # A bare pid is this host's process: stored as the owner string, hostname:pid.
            fields = dict(fields)
            pid = fields.pop("pid")
            fields.setdefault("owner", f"{socket.gethostname()}:{pid}" if pid else None)
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise StoreError(
                f"cannot set {', '.join(sorted(unknown))} on a deployment; "
                f"settable fields are {', '.join(sorted(UPDATABLE))}"
            )
        out = dict(fields)
        if "options" in out and out["options"] is not None:
            out["options"] = json.dumps(dict(out["options"]), sort_keys=True, default=str)
        if isinstance(out.get("heartbeat_at"), str):
            out["heartbeat_at"] = parse_ts(out["heartbeat_at"])
        return out

    def transition(
        self,
        deployment_id: int,
        status: str,
        *,
        error: str | None = None,
        detail: str | None = None,
        **fields: Any,
    ) -> None:
        """Move a deployment to `status`, stamping started_at/completed_at, and record the move.

        Statuses only move forward (constants.TRANSITIONS): a terminal status is final, and
        moving to the status a deployment already has is refused too.
        """
        if status not in STATUSES:
            raise StoreError(f"unknown deployment status {status!r}; use one of {STATUSES}")
        values = self._encode_fields(fields)
        D = self.models.Deployment
        with self._write():
            current = self._require(deployment_id)
            if status not in TRANSITIONS[current]:
                raise StoreError(
                    f"deployment {deployment_id} is {current}; it cannot become {status} "
                    f"(allowed: {', '.join(sorted(TRANSITIONS[current])) or 'none, it is final'})"
                )
            now = self._now()
            values["status"] = status
            if error is not None:
                values["error"] = error
            if status == RUNNING:
                values["started_at"] = pw.fn.COALESCE(D.started_at, self._ts(now))
            if status in TERMINAL_STATUSES:
                values["completed_at"] = now
            changed = (
                D.update(**values).where((D.id == deployment_id) & (D.status == current)).execute()
            )
            if changed != 1:
                raise StoreError(
                    f"deployment {deployment_id} changed status while moving it to {status}; "
                    "read it again and retry"
                )
            self._add_transition(deployment_id, current, status, detail or error)

    def update_deployment(self, deployment_id: int, **fields: Any) -> None:
        """Set fields of a deployment that are not its status (commit, release_id, owner...)."""
        if not fields:
            return
        values = self._encode_fields(fields)
        D = self.models.Deployment
        with self._write():
            self._require(deployment_id)
            D.update(**values).where(D.id == deployment_id).execute()

    def request_cancel(self, deployment_id: int) -> bool:
        """Ask the process running a deployment to cancel it; False if it already ended."""
        D = self.models.Deployment
        with self._write():
            self._require(deployment_id)
            changed = (
                D.update(cancel_requested_at=self._now())
                .where((D.id == deployment_id) & D.status.in_(sorted(ACTIVE_STATUSES)))
                .execute()
            )
        return changed == 1

    def cancel_requested(self, deployment_id: int) -> bool:
        """Whether `fraisier cancel` asked for this deployment to stop."""
        rows = self._query(
            "SELECT cancel_requested_at FROM v_deployment_history WHERE id = ?", [deployment_id]
        )
        return bool(rows and rows[0]["cancel_requested_at"])

    def heartbeat(self, deployment_id: int) -> None:
        """Record that the process running a deployment is still alive."""
        self.update_deployment(deployment_id, heartbeat_at=self._now())

    def record_host_results(
        self, deployment_id: int, stats: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Store per-host counts ({host: {ok, changed, failures, unreachable, ...}}), replacing
        earlier results of the same hosts."""
        with self._write():
            self._require(deployment_id)
            self._replace_hosts(deployment_id, stats)

    def _replace_hosts(self, deployment_id: int, stats: Mapping[str, Mapping[str, Any]]) -> None:
        H = self.models.DeploymentHost
        rows = []
        for host, counts in stats.items():
            row = {key: int(counts.get(key) or 0) for key in HOST_STAT_KEYS}
            if "dark" in counts and not row["unreachable"]:
                row["unreachable"] = int(counts.get("dark") or 0)
            if "failed" in counts and not row["failures"]:
                row["failures"] = int(counts.get("failed") or 0)
            row["status"] = (
                "unreachable"
                if row["unreachable"]
                else "failed"
                if row["failures"]
                else "changed"
                if row["changed"]
                else "ok"
            )
            rows.append({"deployment": deployment_id, "host": str(host), **row})
        if not rows:
            return
        H.delete().where(
            (H.deployment == deployment_id) & (H.host.in_([r["host"] for r in rows]))
        ).execute()
        H.insert_many(rows).execute()

    def event_writer(
        self,
        deployment_id: int,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        redact: Callable[[str], str] | None = None,
        backlog: int = 2000,
    ) -> EventWriter:
        """A started EventWriter for a deployment's runner events."""
        if self.readonly:
            raise StoreError(f"{self.label}: the store was opened read-only; cannot store events")
        return EventWriter(
            self,
            deployment_id,
            batch_size=batch_size,
            flush_interval=flush_interval,
            redact=redact,
            backlog=backlog,
        )

    def _insert_events(
        self,
        rows: Sequence[tuple],
        stats: Mapping[str, Mapping[str, Any]] | None,
        deployment_id: int,
    ) -> int:
        """Insert prepared event rows (and host stats) in one transaction; return rows added."""
        columns = ", ".join(f'"{c}"' for c in EVENT_COLUMNS)
        marks = ", ".join([self.db.param] * len(EVENT_COLUMNS))
        sql = (
            f'INSERT INTO "tb_deployment_events" ({columns}) VALUES ({marks}) '
            "ON CONFLICT DO NOTHING"
        )
        with self._write():
            cursor = self.db.cursor()
            inserted = 0
            if rows:
                cursor.executemany(sql, rows)
                inserted = max(cursor.rowcount, 0)
            if stats:
                self._replace_hosts(deployment_id, stats)
        return inserted

    # ------------------------------------------------------------------ locks

    def acquire_lock(
        self,
        fraise: str,
        environment: str,
        *,
        holder: str,
        deployment_id: int | None = None,
        lease_seconds: float,
    ) -> None:
        """Take the lease of a fraise+environment, or take over an expired one; else LockedError.

        The same holder acquiring again renews its lease.
        """
        L = self.models.Lock
        with self._write():
            now = self._now()
            expires = now + timedelta(seconds=lease_seconds)
            values = {
                "holder": holder,
                "deployment": deployment_id,
                "acquired_at": now,
                "expires_at": expires,
            }
            cursor = self.db.execute(
                L.insert(fraise=fraise, environment=environment, **values).on_conflict_ignore()
            )
            if cursor.rowcount == 1:
                return
            taken = (
                L.update(**values)
                .where(
                    (L.fraise == fraise)
                    & (L.environment == environment)
                    & ((L.expires_at <= now) | (L.holder == holder))
                )
                .execute()
            )
            if taken == 1:
                return
            row = (
                L.select(L.holder, L.deployment, L.acquired_at)
                .where((L.fraise == fraise) & (L.environment == environment))
                .tuples()
                .first()
            )
        other, other_deployment, since = row if row else ("another process", None, now)
        what = f"deployment {other_deployment}, " if other_deployment is not None else ""
        raise LockedError(
            f"{fraise}/{environment} is being deployed by {other} ({what}since "
            f"{iso_utc(since)}); wait for it or use --wait"
        )

    def renew_lock(
        self, fraise: str, environment: str, *, holder: str, lease_seconds: float
    ) -> bool:
        """Extend the lease held by `holder`; False if it does not hold it any more."""
        L = self.models.Lock
        with self._write():
            now = self._now()
            changed = (
                L.update(expires_at=now + timedelta(seconds=lease_seconds))
                .where(
                    (L.fraise == fraise)
                    & (L.environment == environment)
                    & (L.holder == holder)
                    & (L.expires_at > now)
                )
                .execute()
            )
        return changed == 1

    def release_lock(self, fraise: str, environment: str, *, holder: str) -> None:
        """Give the lock back; a lock held by someone else is left alone."""
        L = self.models.Lock
        with self._write():
            L.delete().where(
                (L.fraise == fraise) & (L.environment == environment) & (L.holder == holder)
            ).execute()

    # ------------------------------------------------------------------ crash recovery

    def mark_interrupted(self, is_alive: Callable[[str], bool] = local_process_alive) -> list[int]:
        """Mark running deployments whose owner is dead as interrupted and free their locks."""
        D, L = self.models.Deployment, self.models.Lock
        with self._errors():
            running = list(
                D.select(D.id, D.owner).where(D.status == RUNNING).order_by(D.id).tuples()
            )
        # is_alive may be slow (it may ask the OS): call it outside any transaction.
        dead = [(did, owner) for did, owner in running if not is_alive(owner or "")]
        marked = []
        for deployment_id, owner in dead:
            error = f"the process that ran it ({owner or 'unknown'}) is gone"
            with self._write():
                changed = (
                    D.update(status=INTERRUPTED, completed_at=self._now(), error=error)
                    .where((D.id == deployment_id) & (D.status == RUNNING))
                    .execute()
                )
                if changed != 1:
                    continue
                self._add_transition(deployment_id, RUNNING, INTERRUPTED, error)
                condition = L.deployment == deployment_id
                if owner:
                    condition |= L.holder == owner
                L.delete().where(condition).execute()
            marked.append(deployment_id)
        return marked

    # ------------------------------------------------------------------ webhooks and queue

    # The webhook write path is hand-written SQL: building these statements through the
    # query builder cost ten times as much as running them, and part of that inside the
    # write transaction, where every other receiver waits. Everything a statement needs
    # (timestamps, JSON, parameter tuples) is made before the transaction opens.

    @functools.cached_property
    def _webhook_sql(self) -> dict[str, str]:
        mark = self.db.param
        returning = " RETURNING id" if self._returning else ""
        # SQLite gives an inserted row's id without RETURNING, which costs it as much as
        # the insert itself; see _insert_id.
        insert_returning = "" if self.is_sqlite else returning
        columns = ", ".join(f'"{c}"' for c in WEBHOOK_COLUMNS)
        queued = ", ".join(f'"{c}"' for c in QUEUED_COLUMNS)
        # An older queued webhook deployment of the same pair and dry_run.
        older = (
            f"fraise = {mark} AND environment = {mark} AND status = '{QUEUED}' "
            f"AND \"trigger\" = 'webhook' AND dry_run = {mark} AND id < {mark}"
        )
        supersede = (
            f"UPDATE tb_deployments SET status = '{SUPERSEDED}', completed_at = {mark}, "
            f"error = {mark} WHERE "
        )
        return {
            # UNIQUE(provider, delivery_id) decides, in the same statement as the insert:
            # no read-then-insert window. NULL delivery ids never collide.
            "webhook": (
                f"INSERT INTO tb_webhook_events ({columns}) "
                f"VALUES ({', '.join([mark] * len(WEBHOOK_COLUMNS))}) "
                f"ON CONFLICT DO NOTHING{insert_returning}"
            ),
            "webhook_id": (
                f"SELECT id FROM tb_webhook_events WHERE provider = {mark} AND delivery_id = {mark}"
            ),
            "deployment": (
                f"INSERT INTO tb_deployments ({queued}) "
                f"VALUES ({', '.join([mark] * len(QUEUED_COLUMNS))}){insert_returning}"
            ),
            "supersede_older": supersede + older + returning,
            "older_ids": f"SELECT id FROM tb_deployments WHERE {older}",
            "supersede_id": supersede + f"id = {mark} AND status = '{QUEUED}'",
            "transition": (
                "INSERT INTO tb_deployment_transitions "
                "(deployment_id, from_status, to_status, detail, created_at) "
                f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark})"
            ),
        }

    @functools.cached_property
    def _shared_write(self) -> _SharedWriteConnection | None:
        """The shared webhook connection of a writable SQLite file; None otherwise."""
        if self.readonly or not self.is_sqlite or self.path is None:
            return None
        if str(self.path) in ("", ":memory:"):
            return None
        return _SharedWriteConnection(self.path)

    @functools.cached_property
    def _returning(self) -> bool:
        """Whether INSERT/UPDATE ... RETURNING can be used (SQLite has it from 3.35)."""
        return not self.is_sqlite or sqlite3.sqlite_version_info >= (3, 35, 0)

    def _insert_id(self, run: Any, sql: str, params: Sequence[Any]) -> int | None:
        """Run an INSERT of one row; its id, or None when ON CONFLICT DO NOTHING skipped it."""
        cursor = run.execute(sql, params)
        if self.is_sqlite or not self._returning:
            return int(cursor.lastrowid) if cursor.rowcount == 1 else None
        # fetchall() steps the statement to its end, so nothing is pending at COMMIT.
        rows = cursor.fetchall()
        return int(rows[0][0]) if rows else None

    def _webhook_row(
        self, values: Mapping[str, Any], outcome: str, reason: str | None, stamp: object
    ) -> tuple:
        if not values.get("provider") or not outcome:
            raise StoreError("a webhook event needs a provider and an outcome")
        row = {**values, "outcome": outcome, "reason": reason, "received_at": stamp}
        return _webhook_values(row)

    def _insert_webhook(self, run: Any, row: tuple) -> tuple[int, bool]:
        """Inside a write transaction: insert a prepared webhook row; (id, is_new)."""
        sql = self._webhook_sql
        new_id = self._insert_id(run, sql["webhook"], row)
        if new_id is not None:
            return new_id, True
        provider, delivery_id = row[0], row[1]
        found = run.execute(sql["webhook_id"], (provider, delivery_id)).fetchone()
        if found is None:
            # Only a NULL delivery id could get here, and NULLs never collide.
            raise StoreError(
                f"{self.label}: webhook delivery {delivery_id!r} from {provider} was neither "
                "recorded nor found; check the UNIQUE index of tb_webhook_events"
            )
        return int(found[0]), False

    def record_webhook_event(self, **fields: Any) -> tuple[int, bool]:
        """Record a delivery; return (id, is_new). A known (provider, delivery_id) is not
        recorded again: the UNIQUE index decides, so two racing receivers cannot both win.
        Takes the keyword arguments of prepare_webhook_record."""
        return self.run_webhook_writes([self.prepare_webhook_record(**fields)])[0]

    def prepare_webhook_record(
        self,
        *,
        provider: str,
        delivery_id: str | None,
        event_type: str | None,
        outcome: str,
        reason: str | None = None,
        ref: str | None = None,
        branch: str | None = None,
        commit: str | None = None,
        repository: str | None = None,
        pusher: str | None = None,
        payload_sha256: str | None = None,
    ) -> Callable[[Any], tuple[int, bool]]:
        """The write of record_webhook_event, checked and ready to run in run_webhook_writes."""
        values = {
            "provider": provider,
            "delivery_id": delivery_id,
            "event_type": event_type,
            "ref": ref,
            "branch": branch,
            "commit": commit,
            "repository": repository,
            "pusher": pusher,
            "payload_sha256": payload_sha256,
        }
        row = self._webhook_row(values, outcome, reason, self._ts(self._now()))
        return functools.partial(self._insert_webhook, row=row)

    def run_webhook_writes(self, writes: Sequence[Callable[[Any], Any]]) -> list[Any]:
        """Run prepared webhook writes in one transaction and one commit; their results.

        One write: its result, or its exception raised. Several: each in a savepoint, so
        that one that fails is undone alone; its place in the list holds a
        BatchedWriteError carrying the exception, and the others commit.
        """
        shared = self._shared_write
        if shared is None:
            with self._write():
                return self._run_writes(_PeeweeCursor(self.db), writes)
        try:
            return shared.run(functools.partial(self._run_writes, writes=writes))
        except pw.IntegrityError:
            raise
        except _DRIVER_ERRORS as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: BaseException) -> StoreError:
        """The StoreError _errors() makes of a driver error."""
        return StoreError(f"{self.label}: {exc}; {_hint(str(exc))}")

    def _run_writes(self, run: Any, writes: Sequence[Callable[[Any], Any]]) -> list[Any]:
        """Inside a write transaction: the body of run_webhook_writes."""
        if len(writes) == 1:
            return [writes[0](run)]
        # Writes fail rarely: all of them under one savepoint first. If one fails, that
        # savepoint undoes them all and each runs again under a savepoint of its own.
        run.execute("SAVEPOINT fraisier_batch")
        try:
            results = [write(run) for write in writes]
        except _WRITE_ERRORS:
            run.execute("ROLLBACK TO fraisier_batch")
        else:
            run.execute("RELEASE fraisier_batch")
            return results
        run.execute("RELEASE fraisier_batch")
        results = []
        for write in writes:
            run.execute("SAVEPOINT fraisier_write")
            try:
                results.append(write(run))
            except _WRITE_ERRORS as exc:
                run.execute("ROLLBACK TO fraisier_write")
                # The same StoreError a write run alone gets.
                if not isinstance(exc, StoreError):
                    exc = self._store_error(exc)
                results.append(BatchedWriteError(exc))
            run.execute("RELEASE fraisier_write")
        return results

    def enqueue_from_webhook(self, **fields: Any) -> Enqueued:
        """In one transaction: record the delivery and queue one deployment per target.

        A newer push supersedes the still-queued webhook deployments of the same pair. A
        duplicate delivery queues nothing (result.duplicate is True). No target: the
        delivery is recorded as ignored. Takes the keyword arguments of prepare_enqueue.
        """
        return self.run_webhook_writes([self.prepare_enqueue(**fields)])[0]

    def prepare_enqueue(
        self,
        *,
        provider: str,
        delivery_id: str | None,
        event_type: str | None,
        targets: Sequence[tuple[str, str]],
        commit: str | None,
        branch: str | None,
        ref: str | None = None,
        repository: str | None = None,
        pusher: str | None = None,
        payload_sha256: str | None = None,
        commit_message: str | None = None,
        dry_run: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> Callable[[Any], Enqueued]:
        """The write of enqueue_from_webhook, checked and ready to run in run_webhook_writes."""
        stamp = self._ts(self._now())
        values = {
            "provider": provider,
            "delivery_id": delivery_id,
            "event_type": event_type,
            "ref": ref,
            "branch": branch,
            "commit": commit,
            "repository": repository,
            "pusher": pusher,
            "payload_sha256": payload_sha256,
        }
        if targets:
            webhook_row = self._webhook_row(values, "accepted", None, stamp)
        else:
            reason = "no fraise and environment follow this branch"
            webhook_row = self._webhook_row(values, "ignored", reason, stamp)
        dry_run = bool(dry_run)
        encoded = json.dumps(dict(options), sort_keys=True, default=str) if options else None
        # (fraise, environment, webhook_event_id) are filled in by position inside the
        # transaction; the rest of each row is ready before it opens.
        pairs = [(str(fraise), str(environment)) for fraise, environment in targets]
        tail = (QUEUED, "webhook", commit, branch, dry_run, pusher, commit_message)
        suffix = f" (commit {commit[:12]})" if commit else ""

        def write(run: Any) -> Enqueued:
            sql = self._webhook_sql
            webhook_id, is_new = self._insert_webhook(run, webhook_row)
            if not is_new:
                return Enqueued([], webhook_event_id=webhook_id, duplicate=True)
            ids: list[int] = []
            transitions: list[tuple] = []
            for fraise, environment in pairs:
                deployment_id = self._insert_id(
                    run,
                    sql["deployment"],
                    (fraise, environment, *tail, webhook_id, encoded, stamp),
                )
                transitions.append((deployment_id, None, QUEUED, None, stamp))
                detail = f"superseded by deployment {deployment_id}{suffix}"
                older = self._supersede(
                    run, (stamp, detail, fraise, environment, dry_run, deployment_id)
                )
                transitions.extend((old, QUEUED, SUPERSEDED, detail, stamp) for old in older)
                ids.append(deployment_id)
            if transitions:
                run.executemany(sql["transition"], transitions)
            return Enqueued(ids, webhook_event_id=webhook_id, duplicate=False)

        return write

    def _supersede(self, run: Any, params: tuple) -> list[int]:
        """Inside a write transaction: mark older queued webhook deployments of a pair
        superseded; return their ids."""
        sql = self._webhook_sql
        if self._returning:
            cursor = run.execute(sql["supersede_older"], params)
            return [row[0] for row in cursor.fetchall()]
        # Old SQLite: BEGIN IMMEDIATE already holds the write lock, so reading the ids
        # then updating them cannot race another writer.
        stamp, detail = params[0], params[1]
        older = [row[0] for row in run.execute(sql["older_ids"], params[2:])]
        for old_id in older:
            run.execute(sql["supersede_id"], (stamp, detail, old_id))
        return older

    def claim_next(
        self, *, owner: str, exclude_pairs: Iterable[tuple[str, str]] = ()
    ) -> dict | None:
        """Claim the oldest queued deployment whose pair has nothing running and no live lock.

        The claim moves it straight to `running` with `owner` set (no separate claimed
        status): crash recovery then treats it like any running deployment. None if
        nothing is claimable.
        """
        excluded = {tuple(pair) for pair in exclude_pairs}
        D = self.models.Deployment
        sql = (
            "SELECT q.id, q.fraise, q.environment FROM tb_deployments q "
            # A row with an owner is a CLI deploy waiting for its lock, not work for the queue.
            "WHERE q.status = 'queued' AND q.owner IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM tb_deployments r WHERE r.status = 'running' "
            "AND r.fraise = q.fraise AND r.environment = q.environment) "
            "AND NOT EXISTS (SELECT 1 FROM tb_locks l WHERE l.fraise = q.fraise "
            "AND l.environment = q.environment AND l.expires_at > ?) "
            "ORDER BY q.id"
        ).replace("?", self.db.param)
        claimed = None
        with self._write():
            now = self._now()
            cursor = self.db.execute_sql(sql, (self._ts(now),))
            seen: set[tuple[str, str]] = set()
            for deployment_id, fraise, environment in cursor.fetchall():
                pair = (fraise, environment)
                # Only the oldest queued deployment of a pair may go: keep the order of pushes.
                if pair in excluded or pair in seen:
                    continue
                seen.add(pair)
                changed = (
                    D.update(
                        status=RUNNING,
                        owner=owner,
                        claimed_at=now,
                        started_at=now,
                    )
                    .where((D.id == deployment_id) & (D.status == QUEUED))
                    .execute()
                )
                if changed == 1:
                    self._add_transition(deployment_id, QUEUED, RUNNING, f"claimed by {owner}")
                    claimed = deployment_id
                    break
        return self.deployment(claimed) if claimed is not None else None
