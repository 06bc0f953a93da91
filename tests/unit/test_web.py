"""The webhook receiver and JSON API through Flask's test client, on a temp store."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from fraisier.config import load_config
from fraisier.git import sign_headers
from fraisier.store import Store
from fraisier.web import (
    Checkpointer,
    GroupCommit,
    WriteGate,
    create_app,
    secrets_report,
    write_gate,
)

SECRET = "s3cret-for-tests"
OLD_SECRET = "the-secret-being-rotated-out"
MASTER_SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"

CONFIG = f"""
git:
  max_body_bytes: 65536
  github:
    webhook_secret: [{OLD_SECRET}, {SECRET}]
  gitlab:
    secret_token: {SECRET}
  gitea:
    webhook_secret: {SECRET}
  bitbucket:
    webhook_secret: {SECRET}
fraises:
  api:
    type: api
    repository: /nonexistent/fraisier-test-repo.git
    environments:
      production: {{branch: master, app_path: /srv/api, hosts: [localhost]}}
      staging: {{branch: develop, app_path: /srv/api, hosts: [localhost]}}
  etl:
    type: etl
    repository: /nonexistent/fraisier-test-etl.git
    environments:
      production: {{branch: master, app_path: /srv/etl, hosts: [localhost]}}
branch_mapping:
  master:
    - {{fraise: api, environment: production}}
    - {{fraise: etl, environment: production}}
  name-of-branch: {{fraise: api, environment: staging}}
"""


def payloads_dir() -> Path:
    """The shared payloads folder beside the repository checkout (or $FRAISIER_PAYLOADS_DIR)."""
    override = os.environ.get("FRAISIER_PAYLOADS_DIR")
    path = (
        Path(override) if override else Path(__file__).resolve().parents[2] / "../shared/payloads"
    )
    path = path.resolve()
    if not (path / "github" / "push.json").is_file():
        pytest.fail(f"webhook payloads not found at {path}; set FRAISIER_PAYLOADS_DIR")
    return path


def payload(name: str) -> bytes:
    """Raw bytes of a shared payload file."""
    return (payloads_dir() / name).read_bytes()


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "fraises.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    return path


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "state" / "fraisier.db") as opened:
        yield opened


@pytest.fixture
def app(config_path, store, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAISIER_WORK_DIR", str(tmp_path / "work"))
    return create_app(load_config(config_path), store=store, start_worker=False)


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, provider, body, *, event=None, delivery="d-1", secret=SECRET, **headers):
    """POST `body` signed as `provider` signs it."""
    signed = sign_headers(provider, body, secret, delivery, event)
    signed.update(headers)
    return client.post("/webhook", data=body, headers=signed)


def queued(store):
    return store.history(limit=None)


def webhook_rows(store):
    return store.webhook_events(limit=1000)


# provider, file, event header, HTTP status, answer status, targets queued
CASES = [
    ("github", "github/push_new_branch.json", "push", 202, "queued", 2),
    ("github", "github/push.json", "push", 200, "ignored", 0),
    ("github", "github/ping.json", "ping", 200, "ping", 0),
    ("github", "github/delete.json", "delete", 200, "ignored", 0),
    ("gitlab", "gitlab/push.json", "Push Hook", 202, "queued", 2),
    ("gitlab", "gitlab/tag_push.json", "Tag Push Hook", 200, "ignored", 0),
    ("gitea", "gitea/push.json", "push", 202, "queued", 2),
    ("forgejo", "gitea/push.json", "push", 202, "queued", 2),
    ("gitea", "gitea/create.json", "create", 200, "ignored", 0),
    ("gitea", "gitea/delete.json", "delete", 200, "ignored", 0),
    ("bitbucket", "bitbucket-cloud/repo_push.json", "repo:push", 202, "queued", 1),
    (
        "bitbucket-server",
        "bitbucket-server/repo_refs_changed.json",
        "repo:refs_changed",
        200,
        "ignored",
        0,
    ),
]


@pytest.mark.parametrize(("provider", "name", "event", "code", "status", "count"), CASES)
def test_real_payload_is_answered_and_recorded(
    client, store, provider, name, event, code, status, count
):
    response = post(client, provider, payload(name), event=event, delivery=f"{provider}-1")
    assert response.status_code == code, response.json
    answer = response.json
    assert answer["status"] == status
    assert answer["provider"] == provider
    assert len(answer["deployments"]) == count
    rows = queued(store)
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in answer["deployments"])
    for row in rows:
        assert row["status"] == "queued" and row["trigger"] == "webhook"
        # The pushed commit, never a branch head looked up later.
        assert row["commit"] == answer["events"][0]["commit"]
    recorded = webhook_rows(store)
    assert [r["delivery_id"] for r in recorded] == [f"{provider}-1"]
    expected_outcome = {"queued": "accepted", "ping": "ping", "ignored": "ignored"}[status]
    assert recorded[0]["outcome"] == expected_outcome
    if status == "ignored":
        assert answer["reason"] and recorded[0]["reason"]


def test_tag_push_is_recorded_with_its_reason_and_deploys_nothing(client, store):
    response = post(client, "gitlab", payload("gitlab/tag_push.json"), event="Tag Push Hook")
    assert response.status_code == 200
    assert "tag" in response.json["reason"]
    assert queued(store) == []
    assert "tag" in webhook_rows(store)[0]["reason"]


def test_branch_deletion_is_recorded_and_deploys_nothing(client, store):
    response = post(client, "gitea", payload("gitea/delete.json"), event="delete")
    assert response.status_code == 200
    assert response.json["status"] == "ignored"
    assert "delet" in response.json["reason"]
    assert queued(store) == []


def test_bitbucket_server_push_queues_the_pushed_commit(client, store):
    data = json.loads(payload("bitbucket-server/repo_refs_changed.json"))
    change = data["changes"][0]
    change.update(type="UPDATE", toHash="ab" * 20)
    change["ref"].update(id="refs/heads/master", displayId="master")
    change["refId"] = "refs/heads/master"
    response = post(client, "bitbucket-server", json.dumps(data).encode())
    assert response.status_code == 202, response.json
    assert {r["commit"] for r in queued(store)} == {"ab" * 20}


def test_push_deploys_every_mapped_target(client, store):
    response = post(client, "github", payload("github/push_new_branch.json"), event="push")
    assert response.status_code == 202
    pairs = {(d["fraise"], d["environment"]) for d in response.json["deployments"]}
    assert pairs == {("api", "production"), ("etl", "production")}
    row = store.deployment(response.json["deployments"][0]["id"])
    assert row["commit"] == MASTER_SHA
    assert row["requested_by"] == "Codertocat"
    assert row["commit_message"] == "Initial commit"


def test_secret_being_rotated_out_still_verifies(client, store):
    body = payload("github/push_new_branch.json")
    response = post(client, "github", body, event="push", secret=OLD_SECRET)
    assert response.status_code == 202


def _signed_then(provider, body, change):
    headers = sign_headers(provider, body, SECRET, "bad-1", None)
    change(headers)
    return headers


GITHUB_SIG = "X-Hub-Signature-256"
BAD_SIGNATURES = {
    "missing": lambda h: h.pop(GITHUB_SIG),
    "empty": lambda h: h.update({GITHUB_SIG: ""}),
    "truncated": lambda h: h.update({GITHUB_SIG: h[GITHUB_SIG][:-8]}),
    "garbled": lambda h: h.update({GITHUB_SIG: "sha256=" + "zz" * 32}),
    "no prefix": lambda h: h.update({GITHUB_SIG: h[GITHUB_SIG][len("sha256=") :]}),
    "sha1 only": lambda h: h.pop(GITHUB_SIG),
    "flipped digit": lambda h: h.update(
        {GITHUB_SIG: h[GITHUB_SIG][:-1] + ("0" if h[GITHUB_SIG][-1] != "0" else "1")}
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SIGNATURES))
def test_bad_signature_is_refused_recorded_and_queues_nothing(client, store, case):
    body = payload("github/push_new_branch.json")
    headers = _signed_then("github", body, BAD_SIGNATURES[case])
    if case != "sha1 only":
        headers.pop("X-Hub-Signature")
    response = client.post("/webhook", data=body, headers=headers)
    assert response.status_code == 401
    assert response.json["error"] == "WebhookError"
    assert queued(store) == []
    rows = webhook_rows(store)
    assert [(r["outcome"], r["delivery_id"]) for r in rows] == [("rejected", None)]
    assert SECRET not in json.dumps(response.json)


def test_sha1_where_sha256_is_required_names_the_reason(client):
    body = payload("github/push_new_branch.json")
    headers = sign_headers("github", body, SECRET, "d-1", "push")
    headers.pop(GITHUB_SIG)
    response = client.post("/webhook", data=body, headers=headers)
    assert response.status_code == 401
    assert "SHA-1" in response.json["message"]


def test_wrong_secret_is_refused(client, store):
    response = post(client, "github", payload("github/push_new_branch.json"), secret="guess")
    assert response.status_code == 401
    assert queued(store) == []


def test_body_changed_after_signing_is_refused(client, store):
    body = payload("github/push_new_branch.json")
    headers = sign_headers("github", body, SECRET, "d-1", "push")
    response = client.post("/webhook", data=body.replace(b"master", b"mister"), headers=headers)
    assert response.status_code == 401
    assert queued(store) == []


def test_wrong_gitlab_token_is_refused(client, store):
    response = post(client, "gitlab", payload("gitlab/push.json"), secret="not-it")
    assert response.status_code == 401
    assert queued(store) == []


def test_rejected_delivery_does_not_block_the_genuine_redelivery(client, store):
    body = payload("github/push_new_branch.json")
    assert post(client, "github", body, delivery="g-7", secret="wrong").status_code == 401
    response = post(client, "github", body, delivery="g-7")
    assert response.status_code == 202
    assert len(queued(store)) == 2


def test_provider_without_a_secret_is_refused(tmp_path, store):
    config = tmp_path / "nosecret.yaml"
    config.write_text(
        textwrap.dedent(CONFIG).replace(f"  gitlab:\n    secret_token: {SECRET}\n", "")
    )
    client = create_app(load_config(config), store=store, start_worker=False).test_client()
    response = post(client, "gitlab", payload("gitlab/push.json"), event="Push Hook")
    assert response.status_code == 401
    assert "no webhook secret" in response.json["message"]
    assert queued(store) == []


def test_unset_secret_variable_refuses_that_provider(tmp_path, store, monkeypatch):
    monkeypatch.delenv("FRAISIER_TEST_UNSET_SECRET", raising=False)
    config = tmp_path / "unset.yaml"
    config.write_text(
        textwrap.dedent(CONFIG).replace(
            f"secret_token: {SECRET}", "secret_token: ${FRAISIER_TEST_UNSET_SECRET}"
        )
    )
    loaded = load_config(config)
    ready, refused = secrets_report(loaded)
    assert "github" in ready
    assert any("FRAISIER_TEST_UNSET_SECRET" in item for item in refused)
    client = create_app(loaded, store=store, start_worker=False).test_client()
    response = post(client, "gitlab", payload("gitlab/push.json"))
    assert response.status_code == 401
    assert "FRAISIER_TEST_UNSET_SECRET" in response.json["message"]


def test_start_up_report_names_providers_that_will_be_refused(tmp_path, caplog):
    from fraisier.web import log_secrets

    config = tmp_path / "nobitbucket.yaml"
    config.write_text(
        textwrap.dedent(CONFIG).replace(f"  bitbucket:\n    webhook_secret: {SECRET}\n", "")
    )
    with caplog.at_level(logging.INFO, logger="fraisier.web"):
        log_secrets(load_config(config))
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "bitbucket-server, bitbucket" in warnings[0]
    assert "github" not in warnings[0]
    assert "401" in warnings[0]


def test_oversized_body_is_refused_before_it_is_read(client, store):
    body = b'{"pad": "' + b"x" * 70_000 + b'"}'
    response = post(client, "github", body)
    assert response.status_code == 413
    assert "max_body_bytes" in response.json["message"]
    assert queued(store) == []


def test_oversized_body_without_content_length_is_capped(client, store):
    body = b'{"pad": "' + b"x" * 70_000 + b'"}'
    headers = sign_headers("github", body, SECRET, "d-1", "push")
    headers["Transfer-Encoding"] = "chunked"
    response = client.post(
        "/webhook",
        input_stream=__import__("io").BytesIO(body),
        headers=headers,
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert queued(store) == []


class _Trickle(io.BytesIO):
    """A request body that arrives 1000 bytes per read at most, as from a slow client."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(1000 if size is None or size < 0 else min(size, 1000))


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_body_read_in_many_pieces_is_whole(client, store, declared):
    body = payload("github/push_new_branch.json")
    headers = sign_headers("github", body, SECRET, "d-slow", "push")
    environ = {"wsgi.input_terminated": True}
    if declared:
        environ["CONTENT_LENGTH"] = str(len(body))
    else:
        headers["Transfer-Encoding"] = "chunked"
    response = client.post(
        "/webhook",
        input_stream=_Trickle(body),
        headers=headers,
        environ_overrides=environ,
    )
    assert response.status_code == 202, response.json
    assert [r["payload_sha256"] for r in webhook_rows(store)] == [hashlib.sha256(body).hexdigest()]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"this is not json", id="not-json"),
        pytest.param(b'["a", "json", "array"]', id="json-array"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-too-deep-for-the-cap"),
        pytest.param(b'{"a":' * 5000 + b"1" + b"}" * 5000, id="deeply-nested"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"ref": NaN}', id="nan"),
    ],
)
def test_signed_but_malformed_body_is_refused(client, store, body):
    response = post(client, "github", body)
    assert response.status_code in (400, 413)
    if len(body) <= 65536:
        assert response.status_code == 400
    assert response.json["error"] == "WebhookError"
    assert queued(store) == []


def test_unknown_event_is_recorded_and_deploys_nothing(client, store):
    body = json.dumps({"action": "opened", "issue": {"number": 1}}).encode()
    response = post(client, "github", body, event="issues")
    assert response.status_code == 200
    assert response.json["status"] == "ignored"
    assert queued(store) == []
    assert webhook_rows(store)[0]["outcome"] == "ignored"


def test_unknown_provider_is_refused(client, store):
    body = payload("github/push_new_branch.json")
    response = client.post("/webhook", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not recognised" in response.json["message"]
    forced = client.post("/webhook?provider=nope", data=body)
    assert forced.status_code == 400
    assert "unknown git provider" in forced.json["message"]
    assert queued(store) == []


def test_provider_forced_by_the_url(client, store):
    # Gitea also sends GitHub's headers: forcing github verifies those instead.
    body = payload("gitea/push.json")
    headers = sign_headers("gitea", body, SECRET, "f-1", "push")
    response = client.post("/webhook?provider=github", data=body, headers=headers)
    assert response.status_code == 202
    assert response.json["provider"] == "github"


def test_unmapped_branch_is_ignored_with_its_reason(client, store):
    data = json.loads(payload("github/push_new_branch.json"))
    data["ref"] = "refs/heads/feature/nobody-follows-me"
    response = post(client, "github", json.dumps(data).encode(), event="push")
    assert response.status_code == 200
    assert response.json["status"] == "ignored"
    assert "feature/nobody-follows-me" in response.json["reason"]
    assert queued(store) == []
    assert webhook_rows(store)[0]["outcome"] == "ignored"


def test_replayed_delivery_is_a_duplicate_and_deploys_nothing_more(client, store):
    body = payload("github/push_new_branch.json")
    first = post(client, "github", body, delivery="same-guid")
    assert first.status_code == 202
    again = post(client, "github", body, delivery="same-guid")
    assert again.status_code == 200
    assert again.json["status"] == "duplicate"
    assert again.json["deployments"] == []
    assert len(queued(store)) == 2
    assert len(webhook_rows(store)) == 1


def test_replayed_ping_is_a_duplicate(client, store):
    body = payload("github/ping.json")
    assert post(client, "github", body, event="ping", delivery="p").json["status"] == "ping"
    assert post(client, "github", body, event="ping", delivery="p").json["status"] == "duplicate"


def test_newer_push_supersedes_the_queued_one(client, store):
    data = json.loads(payload("github/push_new_branch.json"))
    first = post(client, "github", json.dumps(data).encode(), delivery="a")
    data["after"] = data["head_commit"]["id"] = "cd" * 20
    second = post(client, "github", json.dumps(data).encode(), delivery="b")
    assert first.status_code == second.status_code == 202
    statuses = {r["id"]: r["status"] for r in queued(store)}
    for old in first.json["deployments"]:
        assert statuses[old["id"]] == "superseded"
    for new in second.json["deployments"]:
        assert statuses[new["id"]] == "queued"
        assert store.deployment(new["id"])["commit"] == "cd" * 20


# --------------------------------------------------------------------------- API


def test_api_status_and_history_use_the_cli_field_names(client, store):
    post(client, "github", payload("github/push_new_branch.json"), delivery="x")
    status = client.get("/api/status").json
    assert {(r["fraise"], r["environment"]) for r in status} == {
        ("api", "production"),
        ("etl", "production"),
    }
    assert set(status[0]) == {
        "fraise",
        "environment",
        "status",
        "commit",
        "branch",
        "deployment_id",
        "started_at",
        "completed_at",
    }
    history = client.get("/api/deployments?fraise=api&environment=production&limit=5").json
    assert len(history) == 1
    assert history[0] == store.history(fraise="api", environment="production", limit=5)[0]
    assert client.get("/api/status?fraise=etl").json[0]["fraise"] == "etl"
    assert len(client.get("/api/deployments?limit=1").json) == 1


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=100000", "status=bogus"])
def test_api_refuses_bad_query_parameters(client, query):
    response = client.get(f"/api/deployments?{query}")
    assert response.status_code == 400
    assert set(response.json) == {"error", "message"}


def test_api_deployment_detail_has_hosts_transitions_and_events(client, store):
    deployment_id = store.create_deployment(
        fraise="api", environment="production", trigger="cli", commit=MASTER_SHA
    )
    store.transition(deployment_id, "running", owner="h:1")
    store.record_host_results(deployment_id, {"localhost": {"ok": 3, "changed": 1}})
    with store.event_writer(deployment_id) as writer:
        writer.put({"event": "playbook_on_start", "counter": 1, "uuid": "u1", "stdout": "PLAY"})
    store.transition(deployment_id, "successful")
    detail = client.get(f"/api/deployments/{deployment_id}").json
    assert detail["status"] == "successful"
    assert detail["hosts"][0]["host"] == "localhost"
    assert [t["to_status"] for t in detail["transitions"]] == ["queued", "running", "successful"]
    assert detail["events"] and detail["events"][0]["event"] == "playbook_on_start"


def test_api_unknown_deployment_is_a_json_404(client):
    response = client.get("/api/deployments/999")
    assert response.status_code == 404
    assert response.json["error"] == "NotFoundError"
    assert client.get("/nope").json["error"] == "NotFound"


def test_health_without_a_worker_here(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {
        "status": "ok",
        "store": "ok",
        "schema_version": response.json["schema_version"],
        "worker": "disabled",
    }


def test_health_follows_a_worker_in_another_process(config_path, store):
    from fraisier.worker import Heartbeat

    heartbeat = Heartbeat()
    client = create_app(
        load_config(config_path), store=store, start_worker=False, heartbeat=heartbeat
    ).test_client()
    assert client.get("/health").status_code == 503
    heartbeat.beat(2)
    assert client.get("/health").json["worker"] == "alive"


# --------------------------------------------------------------------------- in-process worker


def _wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_worker_runs_what_a_push_queued_and_health_follows_it(config_path, store, monkeypatch):
    monkeypatch.setenv("FRAISIER_WORK_DIR", str(config_path.parent / "work"))
    app = create_app(load_config(config_path), store=store, start_worker=True, workers=2)
    worker = app.extensions["fraisier"].worker
    try:
        client = app.test_client()
        assert client.get("/health").json["worker"] == "alive"
        response = post(client, "github", payload("github/push_new_branch.json"))
        assert response.status_code == 202
        ids = [d["id"] for d in response.json["deployments"]]

        def ended():
            rows = [store.deployment(i) for i in ids]
            return rows if all(r["status"] == "failed" for r in rows) else None

        # The repositories do not exist: the claimed deployments must end failed, not stay
        # running, with the reason recorded.
        for row in _wait_for(ended):
            assert row["error"]
            assert row["owner"] == worker.owner
            assert [t["to_status"] for t in row["transitions"]] == ["queued", "running", "failed"]
    finally:
        worker.stop(grace=5)
    response = app.test_client().get("/health")
    assert response.status_code == 503
    assert response.json["worker"] == "stopped"


def test_provider_forced_by_the_server_setting(config_path, store):
    app = create_app(
        load_config(config_path), store=store, start_worker=False, force_provider="github"
    )
    body = payload("gitea/push.json")
    response = app.test_client().post(
        "/webhook", data=body, headers=sign_headers("gitea", body, SECRET, "g-1", "push")
    )
    assert response.status_code == 202
    assert response.json["provider"] == "github"


def test_wrong_method_is_a_json_error(client):
    response = client.get("/webhook")
    assert response.status_code == 405
    assert response.json["error"] == "MethodNotAllowed"


# --------------------------------------------------------------------------- write path


def test_queued_answer_names_the_rows_it_inserted(client, store):
    answer = post(client, "github", payload("github/push_new_branch.json"), delivery="q")
    assert answer.status_code == 202
    assert answer.content_type == "application/json"
    for item in answer.json["deployments"]:
        row = store.deployment(item["id"])
        assert {k: row[k] for k in ("fraise", "environment", "status", "commit", "branch")} == {
            k: item[k] for k in ("fraise", "environment", "status", "commit", "branch")
        }


def test_write_gate_makes_processes_take_turns(tmp_path):
    lock_path = tmp_path / "db-webhook.lock"
    gate = WriteGate(lock_path)
    with gate:
        pass  # opened in this process before the fork: the child must not share it
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()

    def hold() -> None:
        with gate:
            held.set()
            release.wait(10)

    child = ctx.Process(target=hold)
    child.start()
    try:
        assert held.wait(10)
        waited: list[float] = []

        def enter() -> None:
            started = time.monotonic()
            with gate:
                waited.append(time.monotonic() - started)

        thread = threading.Thread(target=enter)
        thread.start()
        time.sleep(0.3)
        assert waited == [] and thread.is_alive()
        release.set()
        thread.join(10)
        assert len(waited) == 1 and waited[0] >= 0.3
    finally:
        release.set()
        child.join(10)


def test_write_gate_of_a_store(store, tmp_path):
    gate = write_gate(store)
    with gate:
        assert Path(f"{store.path}-webhook.lock").exists()


def test_checkpointer_copies_the_wal_and_stops(tmp_path):
    db = tmp_path / "cp.db"
    with Store.open(db) as writer:
        writer.defer_checkpoints()
        for n in range(20):
            writer.enqueue_from_webhook(
                provider="github",
                delivery_id=f"d-{n}",
                event_type="push",
                targets=[("api", "production")],
                commit="c",
                branch="master",
            )
        background = Store.open(db)
        background.close()
        results: list[tuple[int, int]] = []
        checkpoint = background.checkpoint
        background.checkpoint = lambda: results.append(checkpoint()) or results[-1]
        checkpointer = Checkpointer(background, interval=0.05).start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not results:
            time.sleep(0.02)
        checkpointer.stop()
        assert not checkpointer._thread.is_alive()
        frames, copied = results[0]
        assert frames > 0 and copied == frames


def deliver_behind_the_gate(gate, group, writes) -> dict[int, object]:
    """Run each write from a thread of its own while the test holds the write turn, until
    every one waits for it: the first to get it then commits them all. Result or error."""
    results: dict[int, object] = {}

    def deliver(n: int) -> None:
        try:
            results[n] = group.run(writes[n])
        except Exception as exc:
            results[n] = exc

    with gate:
        threads = [threading.Thread(target=deliver, args=(n,)) for n in range(len(writes))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(group._pending) < len(writes) and time.monotonic() < deadline:
            time.sleep(0.005)
    for thread in threads:
        thread.join(10)
    return results


def test_group_commit_runs_waiting_writes_in_one_transaction(store):
    gate = WriteGate(None)
    group = GroupCommit(store, gate)
    batches = []
    real = store.run_webhook_writes

    def counting(writes):
        batches.append(len(writes))
        return real(writes)

    store.run_webhook_writes = counting

    def failing(run):
        run.execute("INSERT INTO no_such_table VALUES (1)")

    writes = [
        store.prepare_enqueue(
            provider="github",
            delivery_id=f"d-{n}",
            event_type="push",
            targets=[("api", "production")],
            commit=f"{n:040x}",
            branch="main",
        )
        for n in range(5)
    ]
    writes.insert(2, failing)
    results = deliver_behind_the_gate(gate, group, writes)

    assert batches == [6]
    assert "no_such_table" in str(results[2])
    queued_ids = [results[n][0] for n in (0, 1, 3, 4, 5)]
    assert len(set(queued_ids)) == 5
    # Each newer push superseded the previous one of the pair: one queued, four superseded.
    statuses = sorted(row["status"] for row in store.history(limit=None))
    assert statuses == ["queued"] + ["superseded"] * 4


def test_waiters_whose_write_was_committed_skip_the_turn_among_processes(store, tmp_path):
    class CountingGate(WriteGate):
        taken = 0

        def lock_processes(self) -> None:
            CountingGate.taken += 1
            super().lock_processes()

    gate = CountingGate(tmp_path / "db-webhook.lock")
    group = GroupCommit(store, gate)
    writes = [
        store.prepare_webhook_record(
            provider="github", delivery_id=f"d-{n}", event_type="ping", outcome="ping"
        )
        for n in range(4)
    ]
    results = deliver_behind_the_gate(gate, group, writes)

    # This test's own turn, then one for the thread that committed all four.
    assert CountingGate.taken == 2
    assert sorted(results) == [0, 1, 2, 3]
    assert all(result[1] is True for result in results.values()), results
    assert len({result[0] for result in results.values()}) == 4


def github_form(body: bytes) -> bytes:
    """The body GitHub sends when a webhook keeps its default content type."""
    return urlencode({"payload": body.decode("utf-8")}).encode("ascii")


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_github_form_encoded_push_queues_the_same_commit(client, store):
    raw = payload("github/push_new_branch.json")
    response = post(client, "github", github_form(raw), event="push", delivery="form-1", **FORM)
    assert response.status_code == 202, response.json
    as_json = post(client, "github", raw, event="push", delivery="json-1")
    assert as_json.status_code == 202, as_json.json
    form_event, json_event = response.json["events"][0], as_json.json["events"][0]
    assert set(form_event) == set(json_event)
    # The same push: every field but the delivery and the deployments it queued.
    own = {"delivery_id", "deployments"}
    assert {k: v for k, v in form_event.items() if k not in own} == {
        k: v for k, v in json_event.items() if k not in own
    }
    assert form_event["commit"] and form_event["branch"]
    assert [r["commit"] for r in queued(store)].count(json_event["commit"]) == 4


def test_github_form_signed_over_the_json_inside_is_refused(client, store):
    raw = payload("github/push_new_branch.json")
    headers = {**sign_headers("github", raw, SECRET, "form-2", "push"), **FORM}
    response = client.post("/webhook", data=github_form(raw), headers=headers)
    assert response.status_code == 401
    assert queued(store) == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"payload=%7B%7D&payload=%7B%7D", "exactly one field, payload"),
        (b"other=%7B%7D", "got fields other"),
        (b"payload=%7B%7D&ref=main", "got fields payload, ref"),
        (b"payload", "not a valid form"),
        (b"payload=%FF", "not a valid form"),
        ("payload=é".encode(), "not a valid form"),
        (b"payload=%5B1%5D", "JSON object"),
    ],
)
def test_bad_github_form_is_refused_and_queues_nothing(client, store, body, problem):
    response = post(client, "github", body, event="push", delivery="form-3", **FORM)
    assert response.status_code == 400
    assert problem in response.json["message"]
    assert queued(store) == []


# ----------------------------------------------------------------- the /webhook fast path


def _through_flask(app):
    """The same app with WebhookEndpoint taken out: POST /webhook reaches the Flask view."""
    from fraisier.web import WebhookEndpoint

    assert isinstance(app.wsgi_app, WebhookEndpoint)
    app.wsgi_app = app.wsgi_app.app
    return app


def _parity_requests():
    push = payload("github/push_new_branch.json")
    signed = sign_headers("github", push, SECRET, "p-1", None)
    other = payload("github/push.json")
    deleted = payload("github/delete.json")
    return [
        ("push", dict(data=push, headers=signed)),
        ("redelivery", dict(data=push, headers=signed)),
        ("bad signature", dict(data=push, headers={**signed, "X-Hub-Signature-256": "sha256=00"})),
        ("delete", dict(data=deleted,
                        headers=sign_headers("github", deleted, SECRET, "p-2", "delete"))),
        ("unmapped", dict(data=other, headers=sign_headers("github", other, SECRET, "p-4"))),
        ("not json", dict(data=b"{no", headers=sign_headers("github", b"{no", SECRET, "p-3"))),
        ("unknown provider", dict(data=push, headers={"Content-Type": "application/json"})),
        ("forced provider", dict(data=push, headers=signed, query_string="provider=gitlab")),
        ("odd query", dict(data=push, headers=signed, query_string="provider=%ff%fe&x")),
        ("too large", dict(data=b"{" + b" " * 70_000 + b"}", headers=signed)),
        ("truncated", dict(data=push, headers=signed,
                           environ_overrides={"CONTENT_LENGTH": str(len(push) + 10)})),
    ]  # fmt: skip


def test_fast_path_answers_exactly_as_the_flask_view(config_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAISIER_WORK_DIR", str(tmp_path / "work"))
    answers, rows = {}, {}
    for side in ("fast", "flask"):
        with Store.open(tmp_path / side / "fraisier.db") as side_store:
            app = create_app(load_config(config_path), store=side_store, start_worker=False)
            if side == "flask":
                _through_flask(app)
            client = app.test_client()
            answers[side] = [
                (
                    name,
                    r.status,
                    r.headers["Content-Type"],
                    r.get_json(),
                    r.headers["Content-Length"] == str(len(r.data)),
                )
                for name, kwargs in _parity_requests()
                for r in [client.post("/webhook", **kwargs)]
            ]
            answers[side].append(
                ("GET", *[(r.status, r.get_json()) for r in [client.get("/webhook")]])
            )
            rows[side] = [
                {k: v for k, v in row.items() if k not in ("received_at",)}
                for row in webhook_rows(side_store)
            ]
    assert answers["fast"] == answers["flask"]
    assert rows["fast"] == rows["flask"]
    statuses = {name: status for name, status, *_ in answers["fast"][:-1]}
    assert statuses == {
        "push": "202 ACCEPTED", "redelivery": "200 OK", "bad signature": "401 UNAUTHORIZED",
        "delete": "200 OK", "unmapped": "200 OK", "not json": "400 BAD REQUEST",
        "unknown provider": "400 BAD REQUEST",
        "forced provider": "401 UNAUTHORIZED", "odd query": "400 BAD REQUEST",
        "too large": "413 REQUEST ENTITY TOO LARGE", "truncated": "400 BAD REQUEST",
    }  # fmt: skip
    assert answers["fast"][-1][1][0] == "405 METHOD NOT ALLOWED"


def test_unexpected_error_on_the_fast_path_is_a_logged_json_500(client, app, caplog):
    receiver = app.extensions["fraisier"]

    def broken(name):
        raise RuntimeError("provider table is broken")

    receiver.provider = broken
    push = payload("github/push.json")
    with caplog.at_level(logging.ERROR, logger="fraisier.web"):
        answer = post(client, "github", push)
    assert answer.status_code == 500
    assert answer.get_json() == {
        "error": "InternalServerError",
        "message": "RuntimeError; see the fraisier-webhook log",
    }
    assert any(
        "unexpected error answering POST /webhook" in r.getMessage() and r.exc_info
        for r in caplog.records
    )


def test_query_string_that_is_not_utf8_is_an_unknown_provider(client, store):
    body = payload("github/push_new_branch.json")
    signed = sign_headers("github", body, SECRET, "q-1")
    answer = client.post(
        "/webhook", data=body, headers=signed, environ_overrides={"QUERY_STRING": "provider=\xff"}
    )
    assert answer.status_code == 400, answer.get_json()
    assert answer.get_json()["error"] == "WebhookError"
    assert queued(store) == []


@pytest.mark.parametrize("code", [409, 503, 599])
def test_store_error_on_the_fast_path_keeps_its_status(client, app, code):
    from fraisier.errors import WebhookError

    def failing(write):
        raise WebhookError("the store said no", code)

    app.extensions["fraisier"].writes.run = failing
    answer = post(client, "github", payload("github/push_new_branch.json"))
    flask_status = app.response_class(status=code).status
    assert answer.status == flask_status
    assert answer.get_json() == {"error": "WebhookError", "message": "the store said no"}
