"""The batched writer of runner events: put() only enqueues, a thread stores batches."""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fraisier.errors import StoreError
from fraisier.store.constants import HOST_STAT_KEYS, MAX_RESULT_BYTES, MAX_STDOUT_BYTES
from fraisier.store.models import parse_ts, utcnow

if TYPE_CHECKING:
    from fraisier.store.api import Store

CENSORED = "the output has been hidden due to the fact that 'no_log: true' was specified"
FAILED_EVENTS = frozenset({"runner_on_failed", "runner_on_unreachable", "runner_item_on_failed"})
EVENT_COLUMNS = (
    "deployment_id",
    "seq",
    "uuid",
    "event",
    "host",
    "play",
    "role",
    "task",
    "action",
    "changed",
    "failed",
    "duration",
    "stdout",
    "result",
    "created_at",
)
_STOP = object()


def bound_text(text: str | None, limit: int) -> str | None:
    """Cut text to at most `limit` UTF-8 bytes, saying how much was cut."""
    if text is None:
        return None
    # A str of n characters is at most 4n bytes: most texts skip the encoding.
    if len(text) * 4 <= limit:
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    marker = f"\n[... cut: {len(data)} bytes in all, {limit} kept]"
    return data[: max(0, limit - len(marker))].decode("utf-8", "ignore") + marker


def _scrub(value: Any) -> Any:
    """Replace every no_log result, however deep in a loop's results, by a censored marker."""
    if isinstance(value, dict):
        if value.get("_ansible_no_log") or "censored" in value:
            return {"censored": value.get("censored") or CENSORED}
        if "results" in value and isinstance(value["results"], list):
            value = dict(value)
            value["results"] = [_scrub(item) for item in value["results"]]
        return value
    return value


# Built once: json.dumps with options builds a new encoder on every call. ASCII output
# keeps lone surrogates from a task's output from breaking the UTF-8 the database wants.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


def result_json(
    res: Any, redact: Callable[[str], str] | None = None, limit: int = MAX_RESULT_BYTES
) -> str | None:
    """The stored form of a task result: scrubbed of no_log data, redacted, bounded JSON."""
    if res is None:
        return None
    text = _ENCODER.encode(_scrub(res))
    if redact is not None:
        text = redact(text)
    if len(text) > limit:
        # Cut JSON is no longer JSON: keep valid JSON that says what was cut.
        size, keep = len(text), limit - 100
        while True:
            cut = _ENCODER.encode({"truncated": True, "size": size, "head": text[:keep]})
            if len(cut) <= limit:
                return cut
            # Escaping can lengthen the head: shrink by the excess and try again.
            keep -= len(cut) - limit + 16
    return text


def _created_at(value: Any, sqlite: bool) -> Any:
    """The event's creation time in the stored form (UTC text on SQLite, else datetime)."""
    # Fast path for the runner's own form, 2026-11-27T03:49:26.540351[+00:00]: a slice.
    if (
        sqlite
        and isinstance(value, str)
        and (len(value) == 26 or (len(value) == 32 and value.endswith("+00:00")))
        and value[10] == "T"
        and value[19] == "."
    ):
        return f"{value[:10]} {value[11:26]}"
    try:
        parsed = parse_ts(value) if value else None
    except (TypeError, ValueError):
        parsed = None
    parsed = parsed or utcnow()
    return parsed.isoformat(" ", "microseconds") if sqlite else parsed


def event_values(
    deployment_id: int,
    event: Mapping[str, Any],
    *,
    fallback_seq: int,
    redact: Callable[[str], str] | None = None,
    sqlite: bool = True,
) -> tuple:
    """Turn a raw ansible-runner event dict into a tb_deployment_events row (EVENT_COLUMNS)."""
    data = event.get("event_data") or {}
    res = data.get("res")
    kind = str(event.get("event") or "unknown")
    stdout = event.get("stdout")
    if stdout is not None:
        if redact is not None:
            stdout = redact(stdout)
        stdout = bound_text(stdout, MAX_STDOUT_BYTES)
    if isinstance(res, dict):
        changed = bool(res.get("changed"))
        failed = kind in FAILED_EVENTS or bool(res.get("failed"))
    else:
        changed, failed = False, kind in FAILED_EVENTS
    duration = data.get("duration")
    if duration is not None and not isinstance(duration, float):
        try:
            duration = float(duration)
        except (TypeError, ValueError):
            duration = None
    seq = event.get("counter")
    return (
        deployment_id,
        seq if isinstance(seq, int) else fallback_seq,
        event.get("uuid"),
        kind,
        data.get("host") or data.get("remote_addr"),
        data.get("play"),
        data.get("role"),
        data.get("task"),
        data.get("task_action") or data.get("resolved_action"),
        changed,
        failed,
        duration,
        stdout,
        result_json(res, redact),
        _created_at(event.get("created"), sqlite),
    )


def event_row(
    deployment_id: int,
    event: Mapping[str, Any],
    *,
    fallback_seq: int,
    redact: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """The same row as event_values, as a dict keyed by column name."""
    values = event_values(deployment_id, event, fallback_seq=fallback_seq, redact=redact)
    return dict(zip(EVENT_COLUMNS, values, strict=True))


def _clean(value: Any) -> Any:
    """Text the database accepts: lone surrogates replaced."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def host_stats_from_runner(event_data: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Pivot a playbook_on_stats event_data ({stat: {host: n}}) into {host: {stat: n}}."""
    aliases = {"dark": "unreachable", "failures": "failures"}
    hosts: dict[str, dict[str, int]] = {}
    for key in (*HOST_STAT_KEYS, "dark", "processed"):
        per_host = event_data.get(key)
        if not isinstance(per_host, Mapping):
            continue
        for host, count in per_host.items():
            stats = hosts.setdefault(str(host), dict.fromkeys(HOST_STAT_KEYS, 0))
            name = aliases.get(key, key)
            if name in stats:
                stats[name] += int(count or 0)
    return hosts


class _Prepared:
    """An event already turned into its row, queued instead of the raw event."""

    __slots__ = ("row", "stats")

    def __init__(self, row: tuple, stats: dict[str, dict[str, int]] | None):
        self.row = row
        self.stats = stats


class EventWriter:
    """Stores runner events in batches from a thread of its own.

    `put` only appends to a queue, so that ansible-runner's output loop never waits on the
    database. The thread collects up to `batch_size` events, or what arrived within
    `flush_interval` seconds, and inserts them in one transaction; a replayed event (same
    runner counter) is ignored by the UNIQUE(deployment_id, seq) index. A playbook_on_stats
    event also records the per-host results. `close` flushes, joins, and raises StoreError
    if some events could not be stored.

    When more than `backlog` events wait (a producer faster than the database), `put`
    turns each new event into its compact row itself, a few microseconds, so that memory
    grows by rows rather than by whole parsed events.
    """

    def __init__(
        self,
        store: Store,
        deployment_id: int,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        redact: Callable[[str], str] | None = None,
        backlog: int = 2000,
    ):
        self._store = store
        self._sqlite = store.is_sqlite
        self.backlog = backlog
        # Both threads draw from it; next() on itertools.count is atomic under the GIL.
        self._fallback_seq = itertools.count(-1, -1)
        self.deployment_id = deployment_id
        self.batch_size = max(1, batch_size)
        self.flush_interval = max(0.0, flush_interval)
        self.redact = redact
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.count = 0
        self.received = 0
        self.batches = 0
        self.lost = 0
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"fraisier-events-{deployment_id}", daemon=True
        )
        self._thread.start()

    def put(self, event: Mapping[str, Any]) -> None:
        """Enqueue one raw runner event; never blocks and never touches the database."""
        if self._queue.qsize() > self.backlog:
            # On failure the raw event is queued: the writer thread records what went wrong.
            with contextlib.suppress(Exception):
                event = self._prepare(event)
        self._queue.put(event)

    def _prepare(self, event: Mapping[str, Any]) -> _Prepared:
        row = event_values(
            self.deployment_id,
            event,
            fallback_seq=next(self._fallback_seq),
            redact=self.redact,
            sqlite=self._sqlite,
        )
        stats = None
        if row[3] == "playbook_on_stats":
            stats = host_stats_from_runner(event.get("event_data") or {})
        return _Prepared(row, stats)

    __call__ = put

    def close(self, timeout: float | None = None) -> None:
        """Store what is queued, stop the thread; raise StoreError if events were lost."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise StoreError(
                f"{self._store.label}: the event writer of deployment {self.deployment_id} "
                f"did not finish within {timeout} s; events may be missing from the store"
            )
        if self.error is not None:
            raise StoreError(
                f"{self._store.label}: {self.lost} events of deployment {self.deployment_id} "
                f"could not be stored ({self.error}); the deployment itself was not affected"
            )

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        get = self._queue.get
        try:
            stop = False
            while not stop:
                first = get()
                if first is _STOP:
                    break
                batch = [first]
                deadline = time.monotonic() + self.flush_interval
                while len(batch) < self.batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            item = get(timeout=remaining)
                        except queue.Empty:
                            break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                self._write(batch)
        finally:
            self._store._close_thread_connection()

    def _write(self, batch: list[Any]) -> None:
        rows = []
        stats = None
        for event in batch:
            self.received += 1
            try:
                prepared = event if isinstance(event, _Prepared) else self._prepare(event)
            except Exception as exc:  # one malformed event must not lose the others
                self.lost += 1
                self.error = exc
                continue
            rows.append(prepared.row)
            if prepared.stats is not None:
                stats = prepared.stats
        try:
            inserted = self._insert(rows, stats)
        except Exception as exc:  # recorded and raised by close(), where the caller can act
            self.lost += len(rows)
            self.error = exc
            return
        self.count += inserted
        self.batches += 1

    def _insert(self, rows: list[tuple], stats: Any) -> int:
        try:
            return self._store._insert_events(rows, stats, self.deployment_id)
        except UnicodeEncodeError:
            # Rare: text the database cannot take. Clean every value and try once more.
            cleaned = [tuple(_clean(value) for value in row) for row in rows]
            return self._store._insert_events(cleaned, stats, self.deployment_id)
