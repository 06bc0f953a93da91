"""The queue worker: threads that claim queued deployments from the store and run them.

The queue lives in the store. Each thread claims the oldest queued deployment whose
fraise+environment has nothing running (`Store.claim_next`, one atomic transaction), then
runs it through `fraisier.deploys.Deployment`, the same code and the same per-pair lock as
`fraisier deploy`. Threads never share a pair, so `workers` bounds how many deployments of
different pairs run at once.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fraisier.errors import FraisierError, StoreError

log = logging.getLogger("fraisier.worker")

POLL_SECONDS = 0.5
RECOVER_SECONDS = 30.0
BEAT_SECONDS = 1.0
# A beat older than this means the worker is stuck or gone.
STALE_SECONDS = 10.0
STOP_GRACE_SECONDS = 60.0


class Heartbeat:
    """Last beat time and live thread count, in memory shared with forked processes.

    The HTTP server runs in processes forked from the one that runs the worker; they read
    this to answer /health without asking the worker anything.
    """

    _FORMAT = "dd"

    def __init__(self) -> None:
        # An anonymous MAP_SHARED mapping survives fork() and is seen by every child.
        self._map = mmap.mmap(-1, struct.calcsize(self._FORMAT))
        self._write(0.0, 0)

    def _write(self, when: float, threads: int) -> None:
        self._map.seek(0)
        self._map.write(struct.pack(self._FORMAT, when, float(threads)))

    def beat(self, threads: int) -> None:
        """Record that the worker is alive with `threads` live deployment threads."""
        self._write(time.time(), threads)

    def read(self) -> tuple[float, int]:
        """(seconds since the last beat, live threads at that beat)."""
        when, threads = struct.unpack(self._FORMAT, self._map[: struct.calcsize(self._FORMAT)])
        return (time.time() - when if when else float("inf")), int(threads)


def _message(exc: BaseException) -> str:
    if isinstance(exc, FraisierError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


class QueueWorker:
    """Threads that claim and run queued deployments; start() them, stop() them."""

    def __init__(
        self,
        config,
        store,
        *,
        workers: int = 1,
        poll_interval: float = POLL_SECONDS,
        work_dir: Path | None = None,
        heartbeat: Heartbeat | None = None,
        deployment_factory: Callable[..., Any] | None = None,
    ):
        from fraisier.store import owner_id

        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.config = config
        self.store = store
        self.workers = workers
        self.poll_interval = poll_interval
        self.work_dir = work_dir
        self.heartbeat = heartbeat or Heartbeat()
        self.owner = owner_id()
        self._factory = deployment_factory
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._supervisor: threading.Thread | None = None
        self._running: dict[int, Any] = {}
        self._running_lock = threading.Lock()
        self.completed = 0

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> QueueWorker:
        """Recover deployments left running by a dead process, then start the threads."""
        from fraisier.deploys import recover

        interrupted = recover(self.store)
        if interrupted:
            log.warning(
                "marked %d deployment(s) interrupted: their process is gone (ids %s)",
                len(interrupted),
                ", ".join(map(str, interrupted)),
            )
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._loop, name=f"fraisier-deploy-{index + 1}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._supervisor = threading.Thread(
            target=self._supervise, name="fraisier-queue-supervisor", daemon=True
        )
        self._supervisor.start()
        self.heartbeat.beat(self.live_threads())
        log.info("queue worker started: up to %d deployment(s) at once", self.workers)
        return self

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Claim nothing more; let running deployments finish for `grace` s, then cancel them."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._running_lock:
            left = list(self._running.values())
        for deployment in left:
            deployment.cancel("canceled: fraisier-webhook is stopping")
        for thread in self._threads:
            thread.join(30.0)
        if self._supervisor is not None:
            self._supervisor.join(5.0)
        self.heartbeat.beat(0)

    def wake(self) -> None:
        """Tell idle threads to look at the queue now rather than at their next poll."""
        with self._wake:
            self._wake.notify_all()

    def live_threads(self) -> int:
        """How many deployment threads are alive."""
        return sum(1 for t in self._threads if t.is_alive())

    def alive(self) -> bool:
        """Whether every deployment thread runs and the supervisor beats."""
        age, _ = self.heartbeat.read()
        return (
            not self._stop.is_set() and self.live_threads() == self.workers and age < STALE_SECONDS
        )

    def running(self) -> list[int]:
        """Ids of the deployments this worker runs now."""
        with self._running_lock:
            return sorted(self._running)

    # -- the threads ---------------------------------------------------------------
    def _supervise(self) -> None:
        from fraisier.deploys import recover

        last_recover = time.monotonic()
        while not self._stop.wait(BEAT_SECONDS):
            self.heartbeat.beat(self.live_threads())
            if time.monotonic() - last_recover >= RECOVER_SECONDS:
                last_recover = time.monotonic()
                # A process that died while we ran (a CLI deploy, an older receiver still
                # exiting at our start) leaves its pair blocked until someone recovers it.
                try:
                    for deployment_id in recover(self.store):
                        log.warning("deployment %d interrupted: its process is gone", deployment_id)
                except FraisierError as exc:
                    log.error("recovering interrupted deployments failed: %s", exc.message)
        self.store.close()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    row = self.store.claim_next(owner=self.owner)
                except StoreError as exc:
                    log.error("cannot claim from the queue: %s", exc.message)
                    row = None
                except Exception:
                    # A thread that died here would stop the queue for good.
                    log.exception("cannot claim from the queue")
                    row = None
                if row is None:
                    with self._wake:
                        if not self._stop.is_set():
                            self._wake.wait(self.poll_interval)
                    continue
                self.run_claimed(row)
        finally:
            self.store.close()

    def run_claimed(self, row: dict) -> str | None:
        """Run one claimed deployment to its end; return its final status."""
        deployment_id = int(row["id"])
        pair = f"{row['fraise']}/{row['environment']}"
        log.info(
            "deployment %d of %s at %s: starting", deployment_id, pair, (row["commit"] or "?")[:12]
        )
        try:
            deployment = self._make(row)
            with self._running_lock:
                self._running[deployment_id] = deployment
            if self._stop.is_set():
                deployment.cancel("canceled: fraisier-webhook is stopping")
            result = deployment.run()
            log.info("deployment %d of %s: %s", deployment_id, pair, result.status)
        except BaseException as exc:
            log.error("deployment %d of %s failed: %s", deployment_id, pair, _message(exc))
            self._fail_if_active(deployment_id, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._running_lock:
                self._running.pop(deployment_id, None)
            self.completed += 1
        final = self.store.deployment(deployment_id) or {}
        return final.get("status")

    def _make(self, row: dict):
        options = row.get("options") or {}
        kwargs = dict(
            store=self.store,
            commit=row.get("commit"),
            branch=row.get("branch"),
            dry_run=bool(row.get("dry_run")),
            force=bool(options.get("force")),
            limit=tuple(options.get("limit") or ()),
            # A CLI deploy of the same pair may hold the lock: wait for it, never fail.
            wait=True,
            trigger=row.get("trigger") or "webhook",
            requested_by=row.get("requested_by"),
            commit_message=row.get("commit_message"),
            deployment_id=int(row["id"]),
            work_dir=self.work_dir,
        )
        if self._factory is not None:
            return self._factory(self.config, row["fraise"], row["environment"], **kwargs)
        from fraisier.deploys import Deployment

        return Deployment(self.config, row["fraise"], row["environment"], **kwargs)

    def _fail_if_active(self, deployment_id: int, exc: BaseException) -> None:
        """A claimed deployment that raised before recording its end must not stay running."""
        from fraisier.store import ACTIVE_STATUSES

        try:
            row = self.store.deployment(deployment_id) or {}
            if row.get("status") in ACTIVE_STATUSES:
                status = "canceled" if isinstance(exc, KeyboardInterrupt) else "failed"
                self.store.transition(deployment_id, status, error=_message(exc))
        except FraisierError as error:
            log.error("cannot record the end of deployment %d: %s", deployment_id, error.message)
