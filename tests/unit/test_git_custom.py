"""Custom providers as users write them, the registry, and the WebhookEvent model."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json

import pytest

from fraisier.errors import ConfigError, WebhookError
from fraisier.git import (
    GitProvider,
    WebhookEvent,
    detect_provider,
    get_provider,
    handle_webhook,
    list_providers,
    register_provider,
    sign_headers,
    unregister_provider,
)
from fraisier.git.github import GitHub, GitHubProvider

SHA = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def forget_registrations():
    """Undo registrations made by a test."""
    before = list_providers()
    yield
    for name in set(list_providers()) - set(before):
        unregister_provider(name)
    for name in before:
        unregister_provider(name)
    assert list_providers() == before


def _mygit_signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.mark.usefixtures("forget_registrations")
def test_the_documented_custom_provider_example():
    # Exactly the shape of the example users were given.
    from fraisier.git import GitProvider, WebhookEvent, register_provider

    class MyGitProvider(GitProvider):
        name = "mygit"

        def verify_webhook_signature(self, payload: bytes, headers: dict) -> bool:
            given = headers.get("X-MyGit-Signature", "")
            expected = _mygit_signature(self.webhook_secret, payload)
            return hmac.compare_digest(given, expected)

        def parse_webhook_event(self, headers: dict, payload: dict) -> WebhookEvent:
            return WebhookEvent(
                provider="mygit",
                event_type="push",
                branch=payload["branch"],
                commit_sha=payload["commit"],
            )

    register_provider(MyGitProvider)
    assert "mygit" in list_providers()

    body = json.dumps({"branch": "main", "commit": SHA}).encode()
    headers = {"x-mygit-signature": _mygit_signature("k", body)}
    provider = get_provider("mygit", {"webhook_secret": "k"})
    assert isinstance(provider, MyGitProvider)
    event = provider.handle(body, headers)
    assert (event.branch, event.commit, event.commit_sha) == ("main", SHA, SHA)
    assert event.ref == "refs/heads/main" and event.is_push and event.should_deploy
    assert event.delivery_id == "sha256:" + hashlib.sha256(body).hexdigest()
    assert event.raw_payload == {"branch": "main", "commit": SHA}

    assert handle_webhook(body, headers, {"webhook_secret": "k"}, provider="mygit") == event
    with pytest.raises(WebhookError) as caught:
        provider.handle(body, {"X-MyGit-Signature": _mygit_signature("other", body)})
    assert caught.value.http_status == 401
    with pytest.raises(WebhookError) as caught:
        get_provider("mygit").handle(body, headers)
    assert caught.value.http_status == 401 and "no webhook secret" in caught.value.message


@pytest.mark.usefixtures("forget_registrations")
def test_example_with_placeholder_verification_refuses_everything():
    class Lazy(GitProvider):
        name = "lazy"

        def verify_webhook_signature(self, payload, headers):
            pass

        def parse_webhook_event(self, headers, payload):
            return WebhookEvent(provider="lazy", event_type="push", branch="main", commit_sha=SHA)

    register_provider(Lazy)
    with pytest.raises(WebhookError) as caught:
        get_provider("lazy", webhook_secret="k").handle(b"{}", {})
    assert caught.value.http_status == 401


@pytest.mark.usefixtures("forget_registrations")
def test_custom_provider_with_event_header_is_detected_before_github():
    @register_provider
    class Lookalike(GitProvider):
        name = "lookalike"
        event_header = "X-Lookalike-Event"

        def verify_webhook_signature(self, payload, headers):
            return headers.get("X-Token") in self.secrets_as_text()

        def secrets_as_text(self):
            return [s.decode() for s in self.secrets]

        def parse_webhook_event(self, headers, payload):
            return WebhookEvent(provider=self.name, event_type="tag_push", tag=payload["tag"])

    headers = {"X-Lookalike-Event": "push", "X-GitHub-Event": "push", "X-Token": "t"}
    assert detect_provider(headers) == "lookalike"
    assert detect_provider({"X-GitHub-Event": "push"}) == "github"
    event = handle_webhook(b'{"tag": "v1"}', headers, webhook_secret=["old", "t"])
    assert (event.provider, event.tag, event.ref, event.is_tag) == (
        "lookalike",
        "v1",
        "refs/tags/v1",
        True,
    )


@pytest.mark.usefixtures("forget_registrations")
def test_detection_follows_registrations_made_after_a_delivery():
    headers = {"X-Later-Event": "push", "X-GitHub-Event": "push"}
    assert detect_provider(headers) == "github"
    assert list_providers()[-1] == "github"

    @register_provider
    class Later(GitHubProvider):
        name = "later"
        event_header = "X-Later-Event"

    assert detect_provider(headers) == "later"
    assert list_providers()[0] == "later"
    unregister_provider("later")
    assert detect_provider(headers) == "github"
    assert "later" not in list_providers()


@pytest.mark.usefixtures("forget_registrations")
def test_registering_under_a_builtin_name_replaces_it_until_unregistered():
    class MyGitHub(GitHubProvider):
        def parse_webhook_event(self, headers, payload):
            event = super().parse_webhook_event(headers, payload)
            return dataclasses.replace(event, reason="frozen by policy")

    register_provider(MyGitHub)
    body = json.dumps({"ref": "refs/heads/main", "after": SHA}).encode()
    headers = sign_headers("github", body, "k")
    assert handle_webhook(body, headers, webhook_secret="k").reason == "frozen by policy"
    unregister_provider("github")
    assert handle_webhook(body, headers, webhook_secret="k").reason is None


@pytest.mark.usefixtures("forget_registrations")
def test_register_under_another_name_reports_that_name():
    cls = register_provider(GitHubProvider, "github-enterprise")
    assert cls.name == "github-enterprise" and GitHubProvider.name == "github"
    body = json.dumps({"ref": "refs/heads/main", "after": SHA}).encode()
    event = get_provider("github-enterprise", webhook_secret="k").handle(
        body, sign_headers("github", body, "k")
    )
    assert event.provider == "github-enterprise"
    assert detect_provider(sign_headers("github", body, "k")) == "github-enterprise"


def test_register_provider_refuses_bad_input():
    with pytest.raises(TypeError):
        register_provider(object)
    with pytest.raises(TypeError):
        register_provider(GitHubProvider())

    class Nameless(GitHubProvider):
        name = ""

    with pytest.raises(ValueError, match="must be 1-64 lowercase"):
        register_provider(Nameless)
    with pytest.raises(ValueError):
        register_provider(GitHubProvider, "Has Spaces")


def test_custom_parser_must_return_a_webhook_event():
    class Broken(GitProvider):
        name = "broken"

        def verify_webhook_signature(self, payload, headers):
            return True

        def parse_webhook_event(self, headers, payload):
            return {"branch": "main"}

    with pytest.raises(TypeError, match="must return a WebhookEvent"):
        Broken(webhook_secret="k").handle(b"{}", {})


def test_custom_event_with_hostile_branch_is_refused():
    class Sloppy(GitProvider):
        name = "sloppy"

        def verify_webhook_signature(self, payload, headers):
            return True

        def parse_webhook_event(self, headers, payload):
            return WebhookEvent(provider=self.name, event_type="push", branch=payload["branch"])

    with pytest.raises(WebhookError) as caught:
        Sloppy(webhook_secret="k").handle(b'{"branch": "--exec=rm"}', {})
    assert caught.value.http_status == 400 and "WebhookEvent.branch" in caught.value.message


def test_bad_provider_config_is_a_config_error():
    with pytest.raises(ConfigError, match="allow_sha1 of git provider github"):
        get_provider("github", webhook_secret="k", allow_sha1="false")
    with pytest.raises(ConfigError, match="webhook_secret of git provider gitlab"):
        get_provider("gitlab", webhook_secret=1234)
    with pytest.raises(ConfigError):
        get_provider("gitea", webhook_secret=["ok", None])


def test_old_config_style_and_aliases_still_work():
    provider = get_provider("github", {"webhook_secret": "x", "base_url": "https://ghe.example"})
    assert isinstance(provider, GitHub)
    assert provider.webhook_secret == "x"
    assert provider.get_signature_header_name() == "X-Hub-Signature-256"
    assert provider.get_event_header_name() == "X-GitHub-Event"
    assert provider.get_clone_url("acme/api") == "https://ghe.example/acme/api.git"
    assert get_provider("gitlab", {"secret": "y"}).secrets == (b"y",)


def test_webhook_event_model():
    event = WebhookEvent(event_type="push", provider="x", branch="main", commit=SHA.upper())
    assert event.commit == event.commit_sha == SHA
    assert event.ref == "refs/heads/main" and event.tag is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.branch = "other"  # type: ignore[misc]
    assert WebhookEvent(sender="bob").pusher == "bob"
    assert WebhookEvent(pusher="bob").sender == "bob"
    with pytest.raises(WebhookError, match="name the same thing"):
        WebhookEvent(commit=SHA, commit_sha="1" * 40)
    from_ref = WebhookEvent(event_type="tag_push", ref="refs/tags/v9", commit=SHA)
    assert (from_ref.tag, from_ref.branch, from_ref.is_tag) == ("v9", None, True)
    assert WebhookEvent(event_type="pull_request").is_pull_request
    assert WebhookEvent(event_type="ping").is_ping
    deletion = WebhookEvent(event_type="branch_delete", branch="old")
    assert deletion.is_deletion and not deletion.should_deploy
    zero = WebhookEvent(event_type="push", branch="main", commit="0" * 40)
    assert not zero.should_deploy and "all zeros" in zero.reason
    assert "names no commit" in WebhookEvent(event_type="push", branch="main").reason
    assert WebhookEvent(event_type="merge_request").reason == "merge_request events do not deploy"
    assert event.reason is None
    assert not WebhookEvent(event_type="push", branch="m", commit=SHA, reason="no").should_deploy
    data = event.to_dict()
    assert data["commit"] == SHA and "raw_payload" not in data and "commit_sha" not in data
    json.dumps(data)
    with pytest.raises(WebhookError, match=r"WebhookEvent\.commit is not a commit id"):
        WebhookEvent(commit="HEAD")
