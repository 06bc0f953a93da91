"""Peewee models of the write tables (tb_*); readers use the views in views.py instead."""

from __future__ import annotations

from datetime import UTC, datetime

import peewee as pw

# SQLite holds timestamps as fixed-width text, "2026-11-27 03:45:01.000000" (UTC), so that
# comparing them as text is comparing them in time.
SQLITE_TS_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def utcnow() -> datetime:
    """The current time as a naive UTC datetime, the form every column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_naive_utc(value: datetime) -> datetime:
    """Convert an aware datetime to naive UTC; a naive one is taken as UTC already."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def parse_ts(value: object) -> datetime | None:
    """Read a timestamp as stored by either backend (text on SQLite, datetime on PostgreSQL)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return to_naive_utc(value)
    text = str(value)
    if text.endswith("Z"):
        text = text[:-1]
    return to_naive_utc(datetime.fromisoformat(text))


def iso_utc(value: object) -> str | None:
    """Format a stored timestamp as ISO 8601 UTC to the second: 2026-11-27T03:45:01Z."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and len(value) >= 19 and value[10] in " T":
        # Stored text is already UTC: slicing avoids a parse on the read path.
        return f"{value[:10]}T{value[11:19]}Z"
    parsed = parse_ts(value)
    return parsed.strftime("%Y-%m-%dT%H:%M:%SZ") if parsed else None


def db_timestamp(db: pw.Database, value: datetime | None) -> object:
    """A datetime in the form the backend stores: fixed-width text on SQLite, else datetime."""
    if value is None:
        return None
    value = to_naive_utc(value)
    if isinstance(db, pw.SqliteDatabase):
        return value.isoformat(" ", "microseconds")
    return value


class UTCDateTimeField(pw.DateTimeField):
    """A UTC timestamp; fixed-width text on SQLite so that ranges and ORDER BY work."""

    def db_value(self, value):
        if value is None:
            return None
        if isinstance(value, str):
            value = parse_ts(value)
        database = self.model._meta.database if self.model else None
        return db_timestamp(database, value) if database else to_naive_utc(value)

    def python_value(self, value):
        return parse_ts(value)


class BaseModel(pw.Model):
    class Meta:
        legacy_table_names = False


class SchemaVersion(BaseModel):
    version = pw.IntegerField(primary_key=True)
    applied_at = UTCDateTimeField(default=utcnow)

    class Meta:
        table_name = "tb_schema_version"


class WebhookEvent(BaseModel):
    id = pw.AutoField()
    provider = pw.CharField(max_length=64)
    # NULL for deliveries rejected before an id could be read; NULLs never collide in UNIQUE.
    delivery_id = pw.CharField(max_length=255, null=True)
    event_type = pw.CharField(max_length=64, null=True)
    ref = pw.CharField(max_length=255, null=True)
    branch = pw.CharField(max_length=255, null=True)
    commit = pw.CharField(max_length=64, null=True)
    repository = pw.CharField(max_length=512, null=True)
    pusher = pw.CharField(max_length=255, null=True)
    outcome = pw.CharField(max_length=16)
    reason = pw.TextField(null=True)
    received_at = UTCDateTimeField(default=utcnow)
    payload_sha256 = pw.CharField(max_length=64, null=True)

    class Meta:
        table_name = "tb_webhook_events"
        indexes = ((("provider", "delivery_id"), True), (("received_at",), False))


class Deployment(BaseModel):
    id = pw.AutoField()
    fraise = pw.CharField(max_length=255)
    environment = pw.CharField(max_length=255)
    status = pw.CharField(max_length=32)
    trigger = pw.CharField(max_length=32)
    commit = pw.CharField(max_length=64, null=True)
    branch = pw.CharField(max_length=255, null=True)
    release_id = pw.CharField(max_length=255, null=True)
    dry_run = pw.BooleanField(default=False)
    requested_by = pw.CharField(max_length=255, null=True)
    commit_message = pw.TextField(null=True)
    webhook_event = pw.ForeignKeyField(
        WebhookEvent, null=True, backref="+", on_delete="SET NULL", column_name="webhook_event_id"
    )
    error = pw.TextField(null=True)
    # JSON text rather than a native JSON type: the same column works on SQLite and PostgreSQL.
    options = pw.TextField(null=True)
    created_at = UTCDateTimeField(default=utcnow)
    started_at = UTCDateTimeField(null=True)
    completed_at = UTCDateTimeField(null=True)
    # "hostname:pid" of the process running it; crash recovery asks whether it still lives.
    owner = pw.CharField(max_length=255, null=True)
    claimed_at = UTCDateTimeField(null=True)
    heartbeat_at = UTCDateTimeField(null=True)
    # Set by `fraisier cancel`; the process running the deployment polls it, which works
    # for a CLI deploy and for one of several running in a webhook worker alike.
    cancel_requested_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "tb_deployments"
        indexes = (
            # status and history per fraise+environment walk this index backwards.
            (("fraise", "environment", "id"), False),
            # The queue (claim_next) and `history --status` scan by status.
            (("status", "id"), False),
        )


class DeploymentTransition(BaseModel):
    id = pw.AutoField()
    # No index of its own: the composite index below starts with deployment_id.
    deployment = pw.ForeignKeyField(
        Deployment, backref="+", on_delete="CASCADE", column_name="deployment_id", index=False
    )
    from_status = pw.CharField(max_length=32, null=True)
    to_status = pw.CharField(max_length=32)
    detail = pw.TextField(null=True)
    created_at = UTCDateTimeField(default=utcnow)

    class Meta:
        table_name = "tb_deployment_transitions"
        indexes = ((("deployment", "id"), False),)


class DeploymentEvent(BaseModel):
    id = pw.AutoField()
    # No index of its own: the composite index below starts with deployment_id.
    deployment = pw.ForeignKeyField(
        Deployment, backref="+", on_delete="CASCADE", column_name="deployment_id", index=False
    )
    seq = pw.IntegerField()
    uuid = pw.CharField(max_length=64, null=True)
    event = pw.CharField(max_length=64)
    host = pw.CharField(max_length=255, null=True)
    play = pw.TextField(null=True)
    role = pw.CharField(max_length=255, null=True)
    task = pw.TextField(null=True)
    action = pw.CharField(max_length=255, null=True)
    changed = pw.BooleanField(default=False)
    failed = pw.BooleanField(default=False)
    duration = pw.FloatField(null=True)
    stdout = pw.TextField(null=True)
    result = pw.TextField(null=True)
    created_at = UTCDateTimeField(default=utcnow)

    class Meta:
        table_name = "tb_deployment_events"
        # A replayed event (same runner counter) is ignored, never stored twice.
        indexes = ((("deployment", "seq"), True),)


class DeploymentHost(BaseModel):
    id = pw.AutoField()
    # No index of its own: the composite index below starts with deployment_id.
    deployment = pw.ForeignKeyField(
        Deployment, backref="+", on_delete="CASCADE", column_name="deployment_id", index=False
    )
    host = pw.CharField(max_length=255)
    ok = pw.IntegerField(default=0)
    changed = pw.IntegerField(default=0)
    failures = pw.IntegerField(default=0)
    unreachable = pw.IntegerField(default=0)
    skipped = pw.IntegerField(default=0)
    rescued = pw.IntegerField(default=0)
    ignored = pw.IntegerField(default=0)
    status = pw.CharField(max_length=16)

    class Meta:
        table_name = "tb_deployment_hosts"
        indexes = ((("deployment", "host"), True),)


class Lock(BaseModel):
    fraise = pw.CharField(max_length=255)
    environment = pw.CharField(max_length=255)
    holder = pw.CharField(max_length=255)
    deployment = pw.ForeignKeyField(
        Deployment,
        null=True,
        backref="+",
        on_delete="SET NULL",
        column_name="deployment_id",
        index=False,
    )
    acquired_at = UTCDateTimeField(default=utcnow)
    expires_at = UTCDateTimeField()

    class Meta:
        table_name = "tb_locks"
        primary_key = pw.CompositeKey("fraise", "environment")


# Live (not dry-run) deployments per pair: v_fraise_status seeks each pair's MAX(id) here.
# The view's `NOT x.dry_run` must match this WHERE for SQLite to use the index.
Deployment.add_index(
    Deployment.index(
        Deployment.fraise,
        Deployment.environment,
        Deployment.id,
        where=~Deployment.dry_run,
        name="tb_deployments_live",
    )
)


MODELS: tuple[type[BaseModel], ...] = (
    SchemaVersion,
    WebhookEvent,
    Deployment,
    DeploymentTransition,
    DeploymentEvent,
    DeploymentHost,
    Lock,
)


class BoundModels:
    """The models bound to one database, so that several stores can live in one process."""

    def __init__(self, db: pw.Database):
        self.db = db
        bound: dict[type[BaseModel], type[BaseModel]] = {}
        for model in MODELS:
            meta = type("Meta", (), {"database": db, "table_name": model._meta.table_name})
            bound[model] = type(model.__name__, (model,), {"Meta": meta, "__module__": __name__})
        for sub in bound.values():
            # Point foreign keys at the bound models: left on the base models, every store
            # opened would add back-references to them that outlive it.
            for field in list(sub._meta.refs):
                base = field.rel_model
                sub._meta.remove_ref(field)
                if not base._meta.model_backrefs.get(sub):
                    base._meta.model_backrefs.pop(sub, None)
                field.rel_model = bound[base]
                sub._meta.add_ref(field)
        self.SchemaVersion = bound[SchemaVersion]
        self.WebhookEvent = bound[WebhookEvent]
        self.Deployment = bound[Deployment]
        self.DeploymentTransition = bound[DeploymentTransition]
        self.DeploymentEvent = bound[DeploymentEvent]
        self.DeploymentHost = bound[DeploymentHost]
        self.Lock = bound[Lock]
        self.all = tuple(bound.values())
