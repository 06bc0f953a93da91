"""Deployment statuses, webhook outcomes and the legal moves between statuses."""

from __future__ import annotations

QUEUED = "queued"
RUNNING = "running"
SUCCESSFUL = "successful"
FAILED = "failed"
CANCELED = "canceled"
TIMEOUT = "timeout"
ROLLED_BACK = "rolled_back"
ROLLBACK_FAILED = "rollback_failed"
INTERRUPTED = "interrupted"
SUPERSEDED = "superseded"

STATUSES: tuple[str, ...] = (
    QUEUED,
    RUNNING,
    SUCCESSFUL,
    FAILED,
    CANCELED,
    TIMEOUT,
    ROLLED_BACK,
    ROLLBACK_FAILED,
    INTERRUPTED,
    SUPERSEDED,
)
ACTIVE_STATUSES: frozenset[str] = frozenset({QUEUED, RUNNING})
TERMINAL_STATUSES: frozenset[str] = frozenset(STATUSES) - ACTIVE_STATUSES

# A queued deployment never ran, so it cannot end as successful or rolled back;
# a running one may end in any terminal status. Terminal statuses are final.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELED, SUPERSEDED, FAILED, INTERRUPTED, TIMEOUT}),
    RUNNING: TERMINAL_STATUSES,
    **{status: frozenset() for status in TERMINAL_STATUSES},
}

TRIGGERS: tuple[str, ...] = ("cli", "webhook", "rollback", "api", "retry")

WEBHOOK_OUTCOMES: tuple[str, ...] = ("accepted", "duplicate", "rejected", "ignored", "ping")

HOST_STAT_KEYS: tuple[str, ...] = (
    "ok",
    "changed",
    "failures",
    "unreachable",
    "skipped",
    "rescued",
    "ignored",
)

# Caps applied to every stored runner event, whatever the caller already did.
MAX_STDOUT_BYTES = 4 * 1024
MAX_RESULT_BYTES = 16 * 1024
