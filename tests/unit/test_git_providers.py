"""Every real payload, signed as its provider signs it: detect, verify and parse."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from fraisier.errors import WebhookError
from fraisier.git import detect_provider, get_provider, handle_webhook, sign_headers
from fraisier.git.base import ZERO_SHA

SECRET = "correct horse battery staple"


def payloads_dir() -> Path:
    """The shared payloads folder beside the repository checkout (or $FRAISIER_PAYLOADS_DIR)."""
    override = os.environ.get("FRAISIER_PAYLOADS_DIR")
    path = (
        Path(override) if override else Path(__file__).resolve().parents[2] / "../shared/payloads"
    )
    path = path.resolve()
    if not (path / "github" / "push.json").is_file():
        pytest.fail(
            f"webhook payloads not found at {path}: put a copy of shared/payloads beside the "
            f"repository checkout, or set FRAISIER_PAYLOADS_DIR"
        )
    return path


def payload_bytes(name: str) -> bytes:
    """Raw bytes of a payload file, exactly as stored."""
    return (payloads_dir() / name).read_bytes()


def payload_json(name: str) -> dict:
    """A payload file decoded, for tests that change it before signing."""
    return json.loads(payload_bytes(name))


def deliver(provider: str, body: bytes, event: str | None = None, delivery: str = "d-1", **opts):
    """Sign `body` as `provider` does, then detect and handle it as the receiver will."""
    headers = sign_headers(provider, body, SECRET, delivery, event)
    assert detect_provider(headers) == provider
    return handle_webhook(body, headers, webhook_secret=SECRET, **opts)


# provider, file, event header, expected fields
CASES = [
    (
        "github",
        "github/push_new_branch.json",
        "push",
        dict(
            event_type="push",
            branch="master",
            tag=None,
            ref="refs/heads/master",
            commit="6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            before=ZERO_SHA,
            commit_message="Initial commit",
            repository="Codertocat/Hello-World",
            clone_url="https://github.com/Codertocat/Hello-World.git",
            pusher="Codertocat",
            is_deletion=False,
            should_deploy=True,
        ),
    ),
    (
        "github",
        "github/push.json",
        "push",
        dict(
            event_type="other",
            tag="simple-tag",
            branch=None,
            commit=None,
            before="6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            is_deletion=True,
            should_deploy=False,
        ),
    ),
    (
        "github",
        "github/ping.json",
        "ping",
        dict(event_type="ping", repository="Octocoders/Hello-World", should_deploy=False),
    ),
    (
        "github",
        "github/delete.json",
        "delete",
        dict(event_type="other", tag="simple-tag", is_deletion=True, should_deploy=False),
    ),
    (
        "gitlab",
        "gitlab/push.json",
        "Push Hook",
        dict(
            event_type="push",
            branch="master",
            commit="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            before="95790bf891e76fee5e1747ab589903a6a1f80f22",
            commit_message="fixed readme",
            repository="mike/diaspora",
            clone_url="http://example.com/mike/diaspora.git",
            should_deploy=True,
        ),
    ),
    (
        "gitlab",
        "gitlab/tag_push.json",
        "Tag Push Hook",
        dict(
            event_type="tag_push",
            tag="v1.0.0",
            branch=None,
            ref="refs/tags/v1.0.0",
            commit="82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
            repository="jsmith/example",
            should_deploy=True,
        ),
    ),
    (
        "gitea",
        "gitea/push.json",
        "push",
        dict(
            event_type="push",
            branch="master",
            commit="67b56589a45103f891bdee7c0546e5d40bc02001",
            commit_message="example\n",
            repository="example/example",
            clone_url="http://localhost:3000/example/example.git",
            pusher="example",
            should_deploy=True,
        ),
    ),
    (
        "forgejo",
        "gitea/push.json",
        "push",
        dict(event_type="push", branch="master", commit="67b56589a45103f891bdee7c0546e5d40bc02001"),
    ),
    (
        "gitea",
        "gitea/create.json",
        "create",
        dict(event_type="other", branch="master", should_deploy=False),
    ),
    (
        "gitea",
        "gitea/delete.json",
        "delete",
        dict(event_type="branch_delete", branch="example3", is_deletion=True, should_deploy=False),
    ),
    (
        "bitbucket",
        "bitbucket-cloud/repo_push.json",
        "repo:push",
        dict(
            event_type="push",
            branch="name-of-branch",
            commit="709d658dc5b6d6afcd46049c2f332ee3f515a67d",
            before="1e65c05c1d5171631d92438a13901ca7dae9618c",
            commit_message="new commit message\n",
            repository="team_name/repo_name",
            clone_url="https://bitbucket.org/team_name/repo_name.git",
            pusher="emmap1",
            should_deploy=True,
        ),
    ),
    (
        "bitbucket-server",
        "bitbucket-server/repo_refs_changed.json",
        "repo:refs_changed",
        dict(
            event_type="branch_delete",
            branch="feature/wip",
            before="32a0b8a740c2963c6f56bd8baf3dc05683d299e0",
            commit=None,
            repository="~gopher/webhook-test",
            clone_url="https://server.bitbucket.local/scm/~gopher/webhook-test.git",
            pusher="gopher",
            is_deletion=True,
            should_deploy=False,
        ),
    ),
]


@pytest.mark.parametrize(("provider", "name", "event", "expected"), CASES)
def test_real_payload_detected_verified_and_parsed(provider, name, event, expected):
    body = payload_bytes(name)
    result = deliver(provider, body, event, delivery="delivery-42")
    assert result.provider == provider
    assert result.delivery_id == "delivery-42"
    for field, value in expected.items():
        assert getattr(result, field) == value, field
    if not result.should_deploy:
        assert result.reason
    assert result.raw_payload == json.loads(body)


@pytest.mark.parametrize(("provider", "name", "event", "expected"), CASES)
def test_real_payload_refused_with_wrong_secret(provider, name, event, expected):
    body = payload_bytes(name)
    headers = sign_headers(provider, body, "not the secret", "d-1", event)
    with pytest.raises(WebhookError) as caught:
        handle_webhook(body, headers, webhook_secret=SECRET)
    assert caught.value.http_status == 401
    assert SECRET not in caught.value.message


@pytest.mark.parametrize(("provider", "name", "event", "expected"), CASES)
def test_real_payload_refused_when_body_changed_after_signing(provider, name, event, expected):
    body = payload_bytes(name)
    headers = sign_headers(provider, body, SECRET, "d-1", event)
    if provider == "gitlab":
        # GitLab sends a token, not a signature of the body: nothing to detect here.
        event_obj = handle_webhook(
            body.replace(b"John", b"Mallory"), headers, webhook_secret=SECRET
        )
        assert event_obj.provider == "gitlab"
        return
    tampered = body.replace(b'"', b' "', 1)
    assert tampered != body
    with pytest.raises(WebhookError) as caught:
        handle_webhook(tampered, headers, webhook_secret=SECRET)
    assert caught.value.http_status == 401
    assert "does not match" in caught.value.message


def test_detection_is_case_insensitive_on_plain_dicts():
    body = payload_bytes("gitea/push.json")
    headers = sign_headers("gitea", body, SECRET, "d-1", "push")
    lower = {k.lower(): v for k, v in headers.items()}
    upper = {k.upper(): v for k, v in headers.items()}
    assert detect_provider(lower) == detect_provider(upper) == "gitea"
    assert handle_webhook(body, lower, webhook_secret=SECRET).branch == "master"


def test_gitea_and_forgejo_are_detected_before_github():
    body = payload_bytes("gitea/push.json")
    gitea = sign_headers("gitea", body, SECRET, "d-1", "push")
    assert "X-GitHub-Event" in gitea and "X-Hub-Signature-256" in gitea
    assert detect_provider(gitea) == "gitea"
    assert detect_provider(sign_headers("forgejo", body, SECRET, "d-1", "push")) == "forgejo"
    without_gitea = {k: v for k, v in gitea.items() if not k.startswith(("X-Gitea", "X-Gogs"))}
    assert detect_provider(without_gitea) == "github"


def test_gitea_empty_signature_counts_as_missing_even_with_github_header_valid():
    body = payload_bytes("gitea/push.json")
    headers = sign_headers("gitea", body, SECRET, "d-1", "push")
    headers["X-Gitea-Signature"] = ""
    with pytest.raises(WebhookError) as caught:
        handle_webhook(body, headers, webhook_secret=SECRET)
    assert caught.value.http_status == 401
    assert "X-Gitea-Signature header is empty" in caught.value.message


def test_gitea_zero_commit_test_delivery_is_a_ping():
    data = payload_json("gitea/push.json")
    data["before"] = data["after"] = ZERO_SHA
    data["commits"][0]["id"] = data["head_commit"]["id"] = ZERO_SHA
    data["head_commit"]["message"] = "This is a fake commit"
    event = deliver("gitea", json.dumps(data).encode())
    assert event.event_type == "ping"
    assert "test delivery" in event.reason
    assert not event.should_deploy


def test_gitea_message_is_last_commit_matching_after():
    data = payload_json("gitea/push.json")
    first = copy.deepcopy(data["commits"][0])
    first["id"], first["message"] = "1" * 40, "older commit"
    head = copy.deepcopy(data["commits"][0])
    head["message"] = "the pushed head"
    data["commits"] = [first, head]
    data["head_commit"]["message"] = "summary that differs"
    event = deliver("gitea", json.dumps(data).encode())
    assert event.commit_message == "the pushed head"
    assert event.commit == data["after"]
    data["commits"] = [first]  # head not in the list: fall back to head_commit
    event = deliver("gitea", json.dumps(data).encode())
    assert event.commit_message == "summary that differs"


@pytest.mark.parametrize(
    ("provider", "name", "event"),
    [("gitea", "gitea/push.json", None), ("gitlab", "gitlab/push.json", "Push Hook")],
)
def test_message_found_among_twenty_commits_and_a_bad_entry_is_named(provider, name, event):
    data = payload_json(name)
    pushed = data.get("checkout_sha") or data["after"]
    template = copy.deepcopy(data["commits"][0])
    commits = [dict(template, id=f"{i:040x}", message=f"commit {i}") for i in range(20)]
    commits[12] = dict(template, id=pushed.upper(), message="the pushed one")
    data["commits"] = commits
    data.get("head_commit", {}).pop("message", None)
    assert deliver(provider, json.dumps(data).encode(), event).commit_message == "the pushed one"
    for bad, problem in [
        (5, "field commits[13] must be an object, got number"),
        ({"id": 7}, "field commits[13].id must be a string, got number"),
    ]:
        data["commits"] = [*commits[:13], bad, *commits[13:]]
        with pytest.raises(WebhookError, match=re.escape(problem)):
            deliver(provider, json.dumps(data).encode(), event)


def test_github_message_is_head_commit_when_several_commits_pushed():
    data = payload_json("github/push_new_branch.json")
    older = copy.deepcopy(data["commits"][0])
    older["id"], older["message"] = "2" * 40, "older"
    data["commits"] = [data["commits"][0], older]  # order must not matter
    data["head_commit"]["message"] = "head message"
    event = deliver("github", json.dumps(data).encode())
    assert event.commit_message == "head message"


def test_github_tag_push_and_branch_deletion():
    tag = payload_json("github/push.json")
    tag.update(deleted=False, created=True, after="a" * 40, before=ZERO_SHA)
    event = deliver("github", json.dumps(tag).encode())
    assert (event.event_type, event.tag, event.commit) == ("tag_push", "simple-tag", "a" * 40)
    assert event.should_deploy

    gone = payload_json("github/push_new_branch.json")
    gone.update(deleted=True, after=ZERO_SHA, before="b" * 40, head_commit=None, commits=[])
    event = deliver("github", json.dumps(gone).encode())
    assert (event.event_type, event.branch, event.is_deletion) == ("branch_delete", "master", True)
    assert event.commit is None and not event.should_deploy


def test_gitlab_delivery_id_is_idempotency_key_else_body_hash():
    body = payload_bytes("gitlab/push.json")
    headers = sign_headers("gitlab", body, SECRET, "idem-7", "Push Hook")
    assert handle_webhook(body, headers, webhook_secret=SECRET).delivery_id == "idem-7"
    del headers["Idempotency-Key"]
    event = handle_webhook(body, headers, webhook_secret=SECRET)
    assert event.delivery_id == "sha256:" + hashlib.sha256(body).hexdigest()
    assert event.delivery_id != headers["X-Gitlab-Event-UUID"]


def test_gitlab_branch_deletion_and_annotated_tag_uses_checkout_sha():
    gone = payload_json("gitlab/push.json")
    gone.update(after=ZERO_SHA, checkout_sha=None, commits=[])
    event = deliver("gitlab", json.dumps(gone).encode(), "Push Hook")
    assert (event.event_type, event.branch, event.commit) == ("branch_delete", "master", None)

    tag = payload_json("gitlab/tag_push.json")
    tag["after"] = "c" * 40  # the annotated tag object, not a commit
    event = deliver("gitlab", json.dumps(tag).encode(), "Tag Push Hook")
    assert event.commit == "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"


def test_gitlab_system_hook_push_uses_object_kind():
    body = payload_bytes("gitlab/push.json")
    event = deliver("gitlab", body, "System Hook")
    assert event.event_type == "push"


def test_bitbucket_cloud_branch_deletion_and_tag():
    gone = payload_json("bitbucket-cloud/repo_push.json")
    change = gone["push"]["changes"][0]
    change.update(new=None, closed=True)
    event = deliver("bitbucket", json.dumps(gone).encode())
    assert (event.event_type, event.branch, event.is_deletion) == (
        "branch_delete",
        "name-of-branch",
        True,
    )
    assert event.before == "1e65c05c1d5171631d92438a13901ca7dae9618c"

    tag = payload_json("bitbucket-cloud/repo_push.json")
    tag["push"]["changes"][0]["new"]["type"] = "tag"
    tag["push"]["changes"][0]["new"]["name"] = "v2.0"
    event = deliver("bitbucket", json.dumps(tag).encode())
    assert (event.event_type, event.tag, event.branch) == ("tag_push", "v2.0", None)


def test_bitbucket_server_update_add_and_several_changes():
    data = payload_json("bitbucket-server/repo_refs_changed.json")
    update = data["changes"][0]
    update.update(type="UPDATE", toHash="d" * 40)
    tag = copy.deepcopy(update)
    tag.update(type="ADD", refId="refs/tags/v3", fromHash=ZERO_SHA, toHash="e" * 40)
    data["changes"] = [tag, update]
    body = json.dumps(data).encode()
    headers = sign_headers("bitbucket-server", body, SECRET, "req-1")
    provider = get_provider("bitbucket-server", webhook_secret=SECRET)
    events = provider.handle_all(body, headers)
    assert [(e.event_type, e.ref, e.commit) for e in events] == [
        ("tag_push", "refs/tags/v3", "e" * 40),
        ("push", "refs/heads/feature/wip", "d" * 40),
    ]
    assert {e.delivery_id for e in events} == {"req-1"}
    assert provider.handle(body, headers).ref == "refs/tags/v3"


@pytest.mark.parametrize("body", [b'{"test": true}', b""])
def test_bitbucket_server_diagnostics_ping(body):
    headers = sign_headers("bitbucket-server", body, SECRET, "req-2", "diagnostics:ping")
    assert detect_provider(headers) == "bitbucket-server"
    event = handle_webhook(body, headers, webhook_secret=SECRET)
    assert event.event_type == "ping" and not event.should_deploy
    assert event.delivery_id == "req-2"


def test_bitbucket_cloud_and_server_told_apart_despite_proxy_request_id():
    body = payload_bytes("bitbucket-cloud/repo_push.json")
    headers = sign_headers("bitbucket", body, SECRET, "uuid-1")
    headers["X-Request-Id"] = "added-by-a-proxy"
    assert detect_provider(headers) == "bitbucket"
    assert handle_webhook(body, headers, webhook_secret=SECRET).delivery_id == "uuid-1"
