"""Schema versions: a fresh database is created at SCHEMA_VERSION, an older one is migrated.

Each step in MIGRATIONS takes a database from version N-1 to N and runs, with the recording
of N in tb_schema_version, in one transaction: a failed step leaves the file at N-1.
A fresh database (version 0: no tb_schema_version) is created straight from the models,
which always describe the newest version, so a step never runs on tables it already
produced. The views are derived data: they are dropped and recreated whenever the version
changes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import peewee as pw

from fraisier.store.models import BoundModels, utcnow
from fraisier.store.views import VIEWS

SCHEMA_VERSION = 1

MigrationStep = Callable[[pw.Database, BoundModels], None]


def _create_tables(db: pw.Database, models: BoundModels) -> None:
    db.create_tables(models.all)


# Version N: the step that brings a version N-1 file to N. Step 1 is the creation itself.
MIGRATIONS: dict[int, MigrationStep] = {1: _create_tables}


def read_version(db: pw.Database) -> int:
    """The schema version of an open database; 0 when it holds no Fraisier schema yet."""
    if not db.table_exists("tb_schema_version"):
        return 0
    cursor = db.execute_sql("SELECT MAX(version) FROM tb_schema_version")
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def drop_views(db: pw.Database) -> None:
    """Drop every Fraisier view (they are recreated from VIEWS)."""
    for name in VIEWS:
        db.execute_sql(f"DROP VIEW IF EXISTS {name}")


def create_views(db: pw.Database) -> None:
    """Create every view of VIEWS."""
    for sql in VIEWS.values():
        db.execute_sql(sql)


def migrate(
    db: pw.Database,
    models: BoundModels,
    *,
    transaction: Callable[[], AbstractContextManager[object]],
    target: int | None = None,
    steps: dict[int, MigrationStep] | None = None,
) -> int:
    """Bring the database to `target`, one transaction per step; return the version reached.

    The version is read again inside each transaction, so that two processes opening an
    old file at once migrate it once. A file newer than `target` is left alone.
    """
    target = SCHEMA_VERSION if target is None else target
    steps = MIGRATIONS if steps is None else steps
    while True:
        with transaction():
            current = read_version(db)
            if current >= target:
                return current
            drop_views(db)
            if current == 0:
                _create_tables(db, models)
                version = target
            else:
                version = current + 1
                step = steps.get(version)
                if step is None:
                    raise LookupError(f"no migration step to schema version {version}")
                step(db, models)
            if version == target:
                create_views(db)
            models.SchemaVersion.insert(version=version, applied_at=utcnow()).execute()
