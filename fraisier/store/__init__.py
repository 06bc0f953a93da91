"""The deployment store: write tables (tb_*), read views (v_*), the batched event writer.

from fraisier.store import Store
with Store.open() as store:            # FRAISIER_DATABASE_URL, FRAISIER_DB_PATH or default
    store.status()
"""

from fraisier.store.api import (
    BatchedWriteError,
    Enqueued,
    Store,
    default_db_path,
    local_process_alive,
    owner_id,
)
from fraisier.store.constants import (
    ACTIVE_STATUSES,
    STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    TRIGGERS,
    WEBHOOK_OUTCOMES,
)
from fraisier.store.schema import SCHEMA_VERSION
from fraisier.store.writer import EventWriter, host_stats_from_runner

__all__ = [
    "ACTIVE_STATUSES",
    "SCHEMA_VERSION",
    "STATUSES",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "TRIGGERS",
    "WEBHOOK_OUTCOMES",
    "BatchedWriteError",
    "Enqueued",
    "EventWriter",
    "Store",
    "default_db_path",
    "host_stats_from_runner",
    "local_process_alive",
    "owner_id",
]
