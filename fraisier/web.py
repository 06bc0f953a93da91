"""The webhook receiver and JSON API: Flask app factory and the `fraisier-webhook` server.

A push is verified, recorded and queued in the store within the request; the request never
waits for Ansible. The queue worker (fraisier.worker) runs the queued deployments. POST
/webhook, the one endpoint under load, is answered by WebhookEndpoint, a WSGI layer the app
factory puts in front of Flask; health and the JSON API are Flask views.

`fraisier-webhook` runs the queue worker's threads in its main process and serves HTTP from
a gunicorn server forked from it before any thread starts: several gunicorn worker processes
answer requests (one Python process stops near 1,200 deliveries/s), while deployments are
claimed and run in exactly one place, whatever the number of HTTP processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import werkzeug.urls  # noqa: F401  (registers the werkzeug.url_quote error handler)
from flask import Blueprint, Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

from fraisier.errors import ConfigError, FraisierError, NotFoundError, WebhookError
from fraisier.git import GitProvider, Headers, WebhookEvent, detect_provider, get_provider_class
from fraisier.git import list_providers as _list_providers
from fraisier.store.api import BatchedWriteError

log = logging.getLogger("fraisier.web")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_API_LIMIT = 1000
# How often the server copies the WAL into the database (see Checkpointer).
CHECKPOINT_SECONDS = 0.2
_READ_CHUNK = 64 * 1024
TARGET_CACHE_SIZE = 1024

bp = Blueprint("fraisier", __name__)


# --------------------------------------------------------------------------- secrets


def _config_keys(provider: str) -> tuple[str, ...]:
    # fraises.yaml spells section keys with '_' (bitbucket_server); providers use '-'.
    return tuple(dict.fromkeys((provider, provider.replace("-", "_"))))


def provider_secrets(config, provider: str) -> tuple[str, ...]:
    """The webhook secrets configured for `provider`; () when none (ConfigError if unset var)."""
    for key in _config_keys(provider):
        secrets = config.webhook_secrets(key)
        if secrets:
            return tuple(secrets)
    return ()


def provider_options(config, provider: str) -> dict[str, Any]:
    """Options a GitProvider is built with: secrets, allow_sha1, base_url."""
    options: dict[str, Any] = {"webhook_secret": list(provider_secrets(config, provider))}
    for key in _config_keys(provider):
        found = config.git.section(key)
        if found is not None:
            settings = found[1]
            options["allow_sha1"] = settings.allow_sha1
            if settings.base_url:
                options["base_url"] = settings.base_url
            break
    return options


def secrets_report(config) -> tuple[list[str], list[str]]:
    """(providers with a secret, providers whose deliveries are refused for lack of one)."""
    ready, refused = [], []
    for name in _list_providers():
        try:
            (ready if provider_secrets(config, name) else refused).append(name)
        except ConfigError as exc:
            refused.append(f"{name} ({exc.message})")
    return ready, refused


def log_secrets(config) -> None:
    """Say at start-up which providers can deliver and which are refused."""
    ready, refused = secrets_report(config)
    if ready:
        log.info("webhook secrets configured for: %s", ", ".join(ready))
    if refused:
        log.warning(
            "no webhook secret for %s: deliveries from them are refused with 401 (set "
            "git.<provider>.webhook_secret in fraises.yaml)",
            ", ".join(refused),
        )


# --------------------------------------------------------------------------- app state


class WriteGate:
    """Makes the webhook writes of every thread of every HTTP process on one host take turns.

    Writers that meet inside SQLite do not queue: the loser sleeps in SQLite's busy handler,
    whose back-off (1, 2, 5 ... up to 100 ms a try) is what set the tail latency. Threads of
    one process queue on a threading.Lock, processes on an flock of `path` (a file beside the
    database), where a waiter wakes as soon as the holder lets go. The kernel drops the flock
    of a killed process. Without a path (another database), only threads take turns.
    """

    def __init__(self, path: str | os.PathLike[str] | None):
        self._threads = threading.Lock()
        self._path = os.fspath(path) if path is not None else None
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int | None:
        # Opened lazily and per process: a descriptor inherited across fork() would share
        # its flock with the parent, and the parent's turn would be the child's too.
        if self._path is None:
            return None
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                log.warning(
                    "cannot open %s (%s): HTTP processes will meet in SQLite's busy handler",
                    self._path,
                    exc.strerror,
                )
                self._path = None
                return None
            self._pid = os.getpid()
        return self._fd

    @property
    def threads(self) -> threading.Lock:
        """The turn among this process's threads, the first half of the gate."""
        return self._threads

    def lock_processes(self) -> None:
        """Take the turn among processes; the caller holds `threads`."""
        fd = self._file()
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)

    def unlock_processes(self) -> None:
        """Give the turn among processes back."""
        if self._fd is not None and self._path is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __enter__(self) -> WriteGate:
        self._threads.acquire()
        try:
            self.lock_processes()
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.unlock_processes()
        finally:
            self._threads.release()


class GroupCommit:
    """Commits the webhook writes that wait for the write turn together, in one transaction.

    A delivery's write joins the pending list, then waits for the WriteGate. The thread
    that gets it takes every pending write, its own and those of the threads queued behind
    it, and runs them all in one transaction: one BEGIN, one COMMIT, one pass over the
    index pages they share. A thread whose write was committed by another returns as soon
    as it gets its process's turn, without queueing for the other processes' turns. Every
    write is committed before its delivery is answered.
    """

    def __init__(self, store, gate: WriteGate):
        self.store = store
        self.gate = gate
        self._pending: list[list[Any]] = []
        self._mutex = threading.Lock()

    def run(self, write) -> Any:
        """Run one prepared write (Store.prepare_enqueue, prepare_webhook_record); its result."""
        # [write, result, done]; the gate orders the leader's writes before a waiter's read.
        entry: list[Any] = [write, None, False]
        with self._mutex:
            self._pending.append(entry)
        gate = self.gate
        with gate.threads:
            if not entry[2]:
                gate.lock_processes()
                try:
                    with self._mutex:
                        batch, self._pending = self._pending, []
                    try:
                        results = self.store.run_webhook_writes([e[0] for e in batch])
                    except BaseException as exc:
                        results = [BatchedWriteError(exc)] * len(batch)
                    for item, result in zip(batch, results, strict=True):
                        item[1], item[2] = result, True
                finally:
                    gate.unlock_processes()
        result = entry[1]
        if isinstance(result, BatchedWriteError):
            raise result.error
        return result


class Checkpointer:
    """Runs a SQLite store's WAL checkpoints in a thread, outside every delivery's write turn.

    The HTTP processes' stores defer their checkpoints (Store.defer_checkpoints): their
    commits then only append to the WAL, and the copying and fsyncs happen here.
    """

    def __init__(self, store, interval: float = CHECKPOINT_SECONDS):
        self.store = store
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Checkpointer:
        """Start the thread; returns self."""
        self._thread = threading.Thread(target=self._loop, name="fraisier-checkpoint", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.store.checkpoint()
                failing = False
            except FraisierError as exc:
                # Writers checkpoint themselves once the WAL is large: a failure here only
                # moves that cost back into the requests, so keep trying, and say it once.
                if not failing:
                    log.warning("WAL checkpoint failed, will retry: %s", exc.message)
                failing = True
        with contextlib.suppress(FraisierError):
            self.store.checkpoint()
        self.store.close()

    def stop(self) -> None:
        """Stop the thread after a last checkpoint."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def write_gate(store) -> WriteGate:
    """The WriteGate of a store: an flock beside a SQLite file, threads only otherwise."""
    path = getattr(store, "path", None)
    if getattr(store, "is_sqlite", False) and path is not None:
        return WriteGate(f"{path}-webhook.lock")
    return WriteGate(None)


@dataclass
class Receiver:
    """What the views need: config, store, providers, and how to tell the worker is alive."""

    config: Any
    store: Any
    max_body_bytes: int
    forced_provider: str | None = None
    worker: Any = None
    heartbeat: Any = None
    # A provider, or why its deliveries are refused (its secret is an unset variable).
    _providers: dict[str, GitProvider | str] = field(default_factory=dict)
    # Taken around every webhook write; see WriteGate.
    write_lock: WriteGate = field(default_factory=lambda: WriteGate(None))
    # Runs the webhook writes; see GroupCommit.
    writes: GroupCommit = field(init=False)
    # What a push to each branch deploys: the config does not change while serving, and
    # working it out walks every fraise and environment.
    _targets: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.writes = GroupCommit(self.store, self.write_lock)

    def targets(self, branch: str) -> tuple:
        """The targets of a push to `branch` (Config.targets_for_branch), remembered."""
        found = self._targets.get(branch)
        if found is None:
            found = tuple(self.config.targets_for_branch(branch))
            # Branch names come from outside: remember a bounded number of them.
            if len(self._targets) < TARGET_CACHE_SIZE:
                self._targets[branch] = found
        return found

    def provider(self, name: str) -> GitProvider:
        """The configured provider called `name`; WebhookError 400 unknown, 401 no secret."""
        cached = self._providers.get(name)
        if cached is None:
            provider_class = get_provider_class(name)
            try:
                cached = provider_class(provider_options(self.config, name))
            except ConfigError as exc:
                cached = f"{exc.message}; deliveries from {name} are refused"
            self._providers[name] = cached
        if isinstance(cached, str):
            raise WebhookError(cached, 401)
        return cached

    def worker_state(self) -> tuple[str, bool]:
        """(description, healthy) of the queue worker."""
        if self.worker is not None:
            return ("alive", True) if self.worker.alive() else ("stopped", False)
        if self.heartbeat is not None:
            from fraisier.worker import STALE_SECONDS

            age, threads = self.heartbeat.read()
            if age < STALE_SECONDS and threads > 0:
                return "alive", True
            return "stopped", False
        return "disabled", True


def _receiver() -> Receiver:
    return current_app.extensions["fraisier"]


# --------------------------------------------------------------------------- errors


# What jsonify does for the plain dicts and lists answered here, without its per-call set-up.
# Answers are trees built here, never cyclic: the encoder need not look for cycles.
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def json_text(body: Any) -> str:
    """The JSON text of every answer: plain data (str, int, bool, None, lists and dicts)."""
    return _ENCODER.encode(body) + "\n"


def json_response(body: Any, status: int = 200):
    """A Flask response of json_text(body)."""
    return current_app.response_class(
        json_text(body), status=status, content_type="application/json"
    )


def _error_answer(exc: Exception, method: str, path: str) -> tuple[dict[str, str], int]:
    """The JSON error answer of an exception and its status; unexpected ones are logged."""
    if isinstance(exc, FraisierError):
        status = getattr(exc, "http_status", 500) or 500
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc.message)
        return {"error": type(exc).__name__, "message": exc.message}, status
    if isinstance(exc, HTTPException):
        message = exc.description or exc.name
        return {"error": type(exc).__name__, "message": message}, exc.code or 500
    log.exception("unexpected error answering %s %s", method, path)
    message = f"{type(exc).__name__}; see the fraisier-webhook log"
    return {"error": "InternalServerError", "message": message}, 500


def _error(exc: Exception):
    # Flask's handler for FraisierError, HTTPException and any other Exception.
    return json_response(*_error_answer(exc, request.method, request.path))


# --------------------------------------------------------------------------- /webhook


def _read_body(stream, limit: int, length: int | None) -> bytes | None:
    """The raw body, or None when it is longer than `limit` (never reads more than limit+1).

    `length` is the declared Content-Length, if any: the stream ends there, so once that
    much is read there is no need to ask it for more.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
        if size == length:
            return b"".join(chunks)


def _record_rejected(
    receiver: Receiver,
    provider: str | None,
    headers: Headers,
    reason: str,
    body: bytes | None = None,
) -> None:
    # The delivery id is left out: a rejected delivery must not block the genuine one, and
    # an unverified header proves nothing. The body is never stored.
    values = dict(
        provider=provider or "unknown",
        delivery_id=None,
        event_type=headers.get(_event_header(provider), None),
        outcome="rejected",
        reason=reason[:2000],
        payload_sha256=hashlib.sha256(body).hexdigest() if body is not None else None,
    )
    try:
        receiver.writes.run(receiver.store.prepare_webhook_record(**values))
    except FraisierError as exc:
        log.error("cannot record a rejected delivery: %s", exc.message)


def _event_header(provider: str | None) -> str:
    if provider:
        try:
            header = get_provider_class(provider).event_header
        except WebhookError:
            header = None
        if header:
            return header
    return "X-GitHub-Event"


def _refuse(
    receiver: Receiver,
    provider: str | None,
    headers: Headers,
    exc: WebhookError,
    body: bytes | None,
) -> tuple[dict[str, Any], int]:
    _record_rejected(receiver, provider, headers, exc.message, body)
    log.info("refused %s delivery: %s", provider or "unknown", exc.message)
    return _error_answer(exc, "POST", "/webhook")


def _ignore_reason(event: WebhookEvent) -> str | None:
    """Why an event deploys nothing, or None when it asks for a branch deployment."""
    if not event.should_deploy:
        return event.reason or f"{event.event_type} events do not deploy"
    if event.tag is not None or event.branch is None:
        return f"{event.ref or 'the ref'} is not a branch: tag pushes do not deploy"
    return None


def _handle_event(
    receiver: Receiver, provider: str, delivery: str, event: WebhookEvent, digest: str
) -> dict[str, Any]:
    common = dict(
        provider=provider,
        delivery_id=delivery,
        event_type=event.event_type,
        ref=event.ref,
        branch=event.branch,
        commit=event.commit,
        repository=event.repository,
        pusher=event.pusher,
        payload_sha256=digest,
    )
    summary: dict[str, Any] = {
        "event_type": event.event_type,
        "ref": event.ref,
        "branch": event.branch,
        "commit": event.commit,
    }
    reason = _ignore_reason(event)
    if reason is not None:
        outcome = "ping" if event.is_ping else "ignored"
        _, is_new = receiver.writes.run(
            receiver.store.prepare_webhook_record(outcome=outcome, reason=reason, **common)
        )
        summary.update(status=outcome if is_new else "duplicate", reason=reason, deployments=[])
        return summary
    targets = receiver.targets(event.branch)
    queued = receiver.writes.run(
        receiver.store.prepare_enqueue(
            targets=[(t.fraise, t.environment) for t in targets],
            commit_message=event.commit_message,
            **common,
        )
    )
    if queued.duplicate:
        summary.update(status="duplicate", deployments=[])
    elif not targets:
        summary.update(
            status="ignored",
            reason=f"no fraise and environment follow branch {event.branch!r}",
            deployments=[],
        )
    else:
        summary.update(
            status="queued",
            deployments=[
                {
                    "id": deployment_id,
                    "fraise": target.fraise,
                    "environment": target.environment,
                    "status": "queued",
                    "commit": event.commit,
                    "branch": event.branch,
                }
                for deployment_id, target in zip(queued, targets, strict=True)
            ],
        )
    return summary


def _asked_provider(environ: Mapping[str, Any]) -> str | None:
    """The ?provider= of the webhook URL, read as Flask's request.args reads it."""
    query = environ.get("QUERY_STRING")
    # Parsing the query string is skipped when there is none, as there usually is.
    if not query:
        return None
    # WSGI gives the query as latin-1 text of its bytes. Bytes that are no UTF-8 become
    # U+FFFD, which no provider name holds: an unknown provider rather than a crash.
    text = query.encode("latin-1").decode("utf-8", "replace")
    # werkzeug.urls registers the error handler: undecodable escapes stay percent-encoded.
    for key, value in parse_qsl(text, keep_blank_values=True, errors="werkzeug.url_quote"):
        if key == "provider":
            return value
    return None


def receive_webhook(receiver: Receiver, environ: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Verify, record and queue the delivery of a WSGI request; (JSON answer, status).

    Refusals (bad signature, body too large, unknown provider ...) are answers; an error
    not about the delivery (the store is down) is raised as the FraisierError it is.
    """
    limit = receiver.max_body_bytes
    headers = Headers.from_environ(environ)
    name = _asked_provider(environ) or receiver.forced_provider or detect_provider(headers)

    length = get_content_length(environ)
    if length is not None and length > limit:
        body = None
    else:
        body = _read_body(get_input_stream(environ), limit, length)
    if body is None:
        too_big = WebhookError(
            f"webhook body is larger than git.max_body_bytes ({limit} bytes); raise it in "
            f"fraises.yaml if such pushes are expected",
            413,
        )
        return _refuse(receiver, name, headers, too_big, None)
    if name is None:
        unknown = WebhookError(
            "webhook provider not recognised from the headers (known: "
            f"{', '.join(_list_providers())}); pass ?provider=NAME in the webhook URL",
            400,
        )
        return _refuse(receiver, None, headers, unknown, body)
    try:
        provider = receiver.provider(name)
        events = provider.handle_all(body, headers)
    except WebhookError as exc:
        return _refuse(receiver, name, headers, exc, body)

    digest = hashlib.sha256(body).hexdigest()
    delivery = events[0].delivery_id or f"sha256:{digest}"
    summaries = []
    for index, event in enumerate(events):
        # One delivery may carry several refs (Bitbucket Server); each has its own row,
        # named so that a redelivery maps onto the same rows.
        event_delivery = delivery if index == 0 else f"{delivery}#{index + 1}"
        summaries.append(_handle_event(receiver, name, event_delivery, event, digest))

    deployments = [d for s in summaries for d in s["deployments"]]
    statuses = {s["status"] for s in summaries}
    if deployments:
        status, code = "queued", 202
        if receiver.worker is not None:
            receiver.worker.wake()
    elif statuses == {"duplicate"}:
        status, code = "duplicate", 200
    elif "ping" in statuses:
        status, code = "ping", 200
    else:
        status, code = "ignored", 200
    answer: dict[str, Any] = {
        "status": status,
        "provider": name,
        "delivery_id": delivery,
        "deployments": deployments,
        "events": summaries,
    }
    reasons = [s["reason"] for s in summaries if s.get("reason")]
    if status == "ignored" and reasons:
        answer["reason"] = "; ".join(dict.fromkeys(reasons))
    if log.isEnabledFor(logging.INFO):
        log.info(
            "%s delivery %s: %s%s",
            name,
            delivery,
            status,
            f" ({', '.join(str(d['id']) for d in deployments)})" if deployments else "",
        )
    return answer, code


@bp.post("/webhook")
def webhook():
    """Verify, record and queue one delivery; answer before anything is deployed.

    In an app of create_app, WebhookEndpoint answers POST /webhook before Flask sees it;
    this view serves the blueprint registered in another app.
    """
    return json_response(*receive_webhook(_receiver(), request.environ))


# Status lines as werkzeug writes them (an unknown code is "UNKNOWN" there too).
_STATUS_LINES = {code: f"{code} {HTTP_STATUS_CODES[code].upper()}" for code in HTTP_STATUS_CODES}
_JSON_TYPE = ("Content-Type", "application/json")


class WebhookEndpoint:
    """WSGI middleware answering POST /webhook without Flask's request machinery.

    Flask's request and app contexts, URL matching and response object cost more than all
    of the verification and parsing of a push (about 165 us of CPU a request here, where a
    delivery takes about 450 us in all), and under load every microsecond counts several
    times over. This is the one hot endpoint: it gets the same receive_webhook and the same
    JSON answers and error answers as Flask would give. Every other request goes to Flask.
    """

    def __init__(self, receiver: Receiver, app):
        self.receiver = receiver
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response):
        if environ.get("PATH_INFO") != "/webhook" or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        try:
            answer, code = receive_webhook(self.receiver, environ)
        except Exception as exc:
            answer, code = _error_answer(exc, "POST", "/webhook")
        payload = json_text(answer).encode()
        status = _STATUS_LINES.get(code) or f"{code} UNKNOWN"
        start_response(status, [_JSON_TYPE, ("Content-Length", str(len(payload)))])
        return [payload]


# --------------------------------------------------------------------------- health and API


@bp.get("/health")
def health():
    """200 when the process, the store and the queue worker are fine; 503 otherwise."""
    receiver = _receiver()
    body: dict[str, Any] = {"status": "ok"}
    healthy = True
    try:
        version = receiver.store.schema_version
        body["store"] = "ok"
        body["schema_version"] = version
    except FraisierError as exc:
        body["store"] = exc.message
        healthy = False
    body["worker"], worker_ok = receiver.worker_state()
    healthy = healthy and worker_ok
    if not healthy:
        body["status"] = "unavailable"
    response = jsonify(body)
    response.status_code = 200 if healthy else 503
    return response


def _name_arg(name: str) -> str | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    if len(value) > 255 or any(ord(c) < 32 for c in value):
        raise WebhookError(f"query parameter {name} is not a name: {value[:40]!r}", 400)
    return value


def _limit_arg(default: int = 20) -> int:
    raw = request.args.get("limit")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_API_LIMIT:
        raise WebhookError(
            f"query parameter limit must be a whole number from 1 to {MAX_API_LIMIT}, got "
            f"{raw[:20]!r}",
            400,
        )
    return value


@bp.get("/api/status")
def api_status():
    """Latest deployment per fraise and environment (the fields of `fraisier status --json`)."""
    rows = _receiver().store.status(
        fraise=_name_arg("fraise"), environment=_name_arg("environment")
    )
    return jsonify(rows)


@bp.get("/api/deployments")
def api_deployments():
    """Past deployments, newest first (the fields of `fraisier history --json`)."""
    from fraisier.store import STATUSES

    status = _name_arg("status")
    if status is not None and status not in STATUSES:
        raise WebhookError(
            f"query parameter status must be one of {', '.join(STATUSES)}, got {status!r}", 400
        )
    rows = _receiver().store.history(
        fraise=_name_arg("fraise"),
        environment=_name_arg("environment"),
        limit=_limit_arg(),
        status=status,
    )
    return jsonify(rows)


@bp.get("/api/deployments/<int:deployment_id>")
def api_deployment(deployment_id: int):
    """One deployment with its per-host results, transitions and runner events."""
    store = _receiver().store
    row = store.deployment(deployment_id)
    if row is None:
        raise NotFoundError(f"no deployment {deployment_id} in the store; see /api/deployments")
    return jsonify({**row, "events": store.events(deployment_id)})


# --------------------------------------------------------------------------- factory


def create_app(
    config=None,
    *,
    store=None,
    start_worker: bool = True,
    workers: int = 1,
    heartbeat=None,
    force_provider: str | None = None,
) -> Flask:
    """The Flask app: `config` is a Config, a path to fraises.yaml, or None to find it.

    `start_worker` runs the queue worker's threads in this process (`workers` at once);
    `heartbeat` lets /health follow a worker that runs in another process.
    """
    from fraisier.config import load_config
    from fraisier.store import Store

    if config is None or isinstance(config, str | os.PathLike):
        config = load_config(config)
    if store is None:
        store = Store.open()
    if force_provider:
        get_provider_class(force_provider)

    app = Flask("fraisier")
    app.json.sort_keys = False
    receiver = Receiver(
        config=config,
        store=store,
        max_body_bytes=config.git.max_body_bytes,
        forced_provider=force_provider or None,
        heartbeat=heartbeat,
        write_lock=write_gate(store),
    )
    app.extensions["fraisier"] = receiver
    app.register_blueprint(bp)
    app.register_error_handler(FraisierError, _error)
    app.register_error_handler(HTTPException, _error)
    app.register_error_handler(Exception, _error)
    app.wsgi_app = WebhookEndpoint(receiver, app.wsgi_app)
    if start_worker:
        from fraisier.worker import QueueWorker

        receiver.worker = QueueWorker(config, store, workers=workers).start()
    return app


# --------------------------------------------------------------------------- the server


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _default_http_workers() -> int:
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def serve_http(app_factory, options: Mapping[str, Any]) -> None:
    """Run gunicorn (programmatically) with `options`; each worker builds its app."""
    from gunicorn.app.base import BaseApplication

    class _Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                # Older gunicorn releases lack some settings (the control socket): skip them.
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return app_factory()

    _Server().run()


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no orphan keeps the port."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _run(
    *,
    config,
    host: str,
    port: int,
    workers: int,
    http_workers: int,
    threads: int,
    deploy: bool,
    force_provider: str | None,
    log_level: str,
    access_log: bool,
) -> int:
    from fraisier.deploys import recover
    from fraisier.store import Store
    from fraisier.worker import Heartbeat, QueueWorker

    log_secrets(config)
    with Store.open() as store:
        interrupted = recover(store)
        if interrupted:
            log.warning(
                "marked deployment(s) %s interrupted: the process that ran them is gone",
                ", ".join(map(str, interrupted)),
            )
        store.optimize()
        log.info("store: %s", store.label)
    heartbeat = Heartbeat() if deploy else None

    options = {
        "bind": [_bind_address(host, port)],
        "workers": http_workers,
        "worker_class": "gthread",
        "threads": threads,
        "keepalive": 5,
        "timeout": 30,
        "graceful_timeout": 10,
        "preload_app": False,
        "proc_name": "fraisier-webhook",
        # Its default path is shared by every gunicorn of the user: two servers would clash.
        "control_socket_disable": True,
        "loglevel": log_level,
        "errorlog": "-",
        "accesslog": "-" if access_log else None,
    }

    def factory() -> Flask:
        app = create_app(
            config, start_worker=False, heartbeat=heartbeat, force_provider=force_provider
        )
        # The Checkpointer of the main process copies the WAL into the database.
        app.extensions["fraisier"].store.defer_checkpoints()
        # What is loaded now (modules, config, app) lives as long as the process: out of
        # the collector's sight, its full collections no longer walk all of it.
        gc.freeze()
        return app

    # Fork the HTTP server before any thread exists in this process: forking a process
    # with running threads can leave the child holding locks nobody will release.
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        code = 0
        try:
            _die_with_parent(parent)
            serve_http(factory, options)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("the HTTP server stopped")
            code = 1
        finally:
            os._exit(code)

    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    checkpoint_store = Store.open()
    # Connections are per thread: the Checkpointer's thread opens its own.
    checkpoint_store.close()
    checkpointer = Checkpointer(checkpoint_store).start()
    worker = None
    if deploy:
        worker = QueueWorker(config, Store.open(), workers=workers, heartbeat=heartbeat).start()
    else:
        log.warning("deployments are not run by this process (--no-deploy): they stay queued")
    log.info("listening on http://%s/webhook", _bind_address(host, port))
    _, status = os.waitpid(child, 0)
    if not stopping:
        log.error("the HTTP server exited (status %s); stopping", status)
    if worker is not None:
        worker.stop()
    checkpointer.stop()
    return 0 if stopping else 1


def main(argv: list[str] | None = None) -> None:
    """Console script `fraisier-webhook`."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--host", envvar="FRAISIER_HOST", default=DEFAULT_HOST, show_default=True,
        help="Address to listen on ($FRAISIER_HOST).",
    )  # fmt: skip
    @click.option(
        "--port", envvar="FRAISIER_PORT", type=click.IntRange(1, 65535), default=DEFAULT_PORT,
        show_default=True, help="Port to listen on ($FRAISIER_PORT).",
    )  # fmt: skip
    @click.option(
        "--workers", type=click.IntRange(min=1), default=1, show_default=True,
        help="Deployments run at once (each of a different fraise+environment).",
    )  # fmt: skip
    @click.option(
        "--config", "config_path", type=click.Path(dir_okay=False),
        help="fraises.yaml (default: $FRAISIER_CONFIG, ./fraises.yaml, /etc/fraisier/).",
    )  # fmt: skip
    @click.option(
        "--http-workers", type=click.IntRange(1, 64), default=None,
        help="HTTP server processes [default: 2 per CPU, 2 to 8].",
    )  # fmt: skip
    @click.option(
        "--threads", type=click.IntRange(1, 256), default=4, show_default=True,
        help="Threads per HTTP server process.",
    )  # fmt: skip
    @click.option(
        "--deploy/--no-deploy", default=True, show_default=True,
        help="Run queued deployments here; --no-deploy only receives and queues them.",
    )  # fmt: skip
    @click.option(
        "--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
        default="info", show_default=True,
    )  # fmt: skip
    @click.option("--access-log", is_flag=True, help="Log every request.")
    def command(
        host: str,
        port: int,
        workers: int,
        config_path: str | None,
        http_workers: int | None,
        threads: int,
        deploy: bool,
        log_level: str,
        access_log: bool,
    ) -> None:
        """Receive Git push webhooks and run the deployments they queue."""
        from fraisier.config import load_config

        logging.basicConfig(
            level=log_level.upper(),
            format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
        )
        force = os.environ.get("FRAISIER_GIT_PROVIDER") or None
        try:
            config = load_config(config_path)
            if force:
                get_provider_class(force)
            code = _run(
                config=config,
                host=host,
                port=port,
                workers=workers,
                http_workers=http_workers or _default_http_workers(),
                threads=threads,
                deploy=deploy,
                force_provider=force,
                log_level=log_level,
                access_log=access_log,
            )
        except FraisierError as exc:
            click.echo(f"fraisier-webhook: {exc.message}", err=True)
            sys.exit(2)
        sys.exit(code)

    command.main(args=argv, prog_name="fraisier-webhook")


if __name__ == "__main__":
    main()
