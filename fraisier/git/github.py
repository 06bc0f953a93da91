"""GitHub (github.com and GitHub Enterprise Server) webhooks.

Also holds the parser of the GitHub-style push payload, which Gitea and Forgejo send too.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from fraisier.errors import WebhookError

from .base import (
    ZERO_SHA,
    BuiltinProvider,
    Headers,
    Payload,
    WebhookEvent,
    check_short_ref,
    form_payload,
    hmac_hex,
    is_form,
    load_json_object,
    split_ref,
    validate_ref_name,
)

_EVENT_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Servers that send GitHub's headers too, and their own beside them.
_LOOKALIKE_EVENT_HEADERS = ("X-Gitea-Event", "X-Forgejo-Event", "X-Gogs-Event")


def event_name(headers: Headers, header: str, provider: str) -> str:
    """The event named by `header`, required and token-shaped."""
    value = headers.value(header)
    if value is None:
        raise WebhookError(f"{provider} webhook {header} header is missing", 400)
    if not _EVENT_NAME_RE.fullmatch(value):
        raise WebhookError(f"{provider} webhook {header} header is not an event name", 400)
    return value


def _first_text(p: Payload, *paths: str) -> str | None:
    for path in paths:
        value = p.text(path)
        if value:
            return value
    return None


def _message_of(p: Payload, commit: str, *, prefer_commits: bool) -> str | None:
    """Message of the pushed head commit, from head_commit or the commits list."""
    head_id = p.text("head_commit.id")
    head_message = p.text("head_commit.message")
    from_head = head_message if head_id is None or head_id.lower() == commit else None
    from_list = p.listed_message("commits", commit)
    if prefer_commits:
        return from_list if from_list is not None else from_head
    return from_head if from_head is not None else from_list


def parse_push_payload(
    p: Payload,
    provider: str,
    *,
    prefer_commits: bool,
    default_clone_url: str | None = None,
) -> WebhookEvent:
    """Normalise a GitHub-style push payload (ref, before, after, commits, head_commit)."""
    ref = p.ref("ref", required=True)
    branch, tag = split_ref(ref)
    check_short_ref(branch or tag, p.where("ref"))
    after = p.sha("after", required=True)
    before = p.sha("before")
    deleted = bool(p.get("deleted", bool))
    repository = p.text("repository.full_name")
    common: dict[str, Any] = {
        "provider": provider,
        "ref": ref,
        "branch": branch,
        "tag": tag,
        "before": before,
        "repository": repository,
        "clone_url": p.text("repository.clone_url") or default_clone_url,
        "pusher": _first_text(
            p, "pusher.username", "pusher.login", "pusher.name", "sender.login", "sender.username"
        ),
        "raw_payload": p.data,
    }
    if after == ZERO_SHA and before in (None, ZERO_SHA) and not deleted:
        return WebhookEvent(
            event_type="ping",
            reason="test delivery: its commit id is all zeros, so there is nothing to deploy",
            **common,
        )
    if deleted or after == ZERO_SHA:
        if branch is not None:
            kind, what = "branch_delete", f"branch {branch} was deleted"
        elif tag is not None:
            kind, what = "other", f"tag {tag} was deleted"
        else:
            kind, what = "other", f"ref {ref} was deleted"
        return WebhookEvent(
            event_type=kind, is_deletion=True, reason=f"{what}; nothing to deploy", **common
        )
    message = _message_of(p, after, prefer_commits=prefer_commits)
    if branch is not None:
        return WebhookEvent(event_type="push", commit=after, commit_message=message, **common)
    if tag is not None:
        return WebhookEvent(event_type="tag_push", commit=after, commit_message=message, **common)
    return WebhookEvent(
        event_type="other",
        commit=after,
        commit_message=message,
        reason=f"ref {ref} is neither a branch nor a tag",
        **common,
    )


def parse_ref_event(p: Payload, provider: str, event: str) -> WebhookEvent:
    """Normalise a `create` or `delete` event (short ref name plus ref_type)."""
    name = validate_ref_name(p.text("ref", required=True), p.where("ref"))
    ref_type = p.text("ref_type", required=True)
    if ref_type not in ("branch", "tag"):
        raise p.error("field ref_type must be 'branch' or 'tag'")
    branch, tag = (name, None) if ref_type == "branch" else (None, name)
    common: dict[str, Any] = {
        "provider": provider,
        "branch": branch,
        "tag": tag,
        "repository": p.text("repository.full_name"),
        "clone_url": p.text("repository.clone_url"),
        "pusher": _first_text(p, "sender.login", "sender.username"),
        "raw_payload": p.data,
    }
    if event == "delete":
        return WebhookEvent(
            event_type="branch_delete" if branch is not None else "other",
            is_deletion=True,
            reason=f"{ref_type} {name} was deleted; nothing to deploy",
            **common,
        )
    return WebhookEvent(
        event_type="other",
        reason=f"{event} events do not deploy; the push event for the same ref does",
        **common,
    )


class GitHubProvider(BuiltinProvider):
    """GitHub and GitHub Enterprise Server."""

    name = "github"
    signature_header = "X-Hub-Signature-256"
    legacy_signature_header = "X-Hub-Signature"
    event_header = "X-GitHub-Event"
    delivery_header = "X-GitHub-Delivery"
    default_base_url = "https://github.com"

    @classmethod
    def detect(cls, headers: Mapping[str, str]) -> bool:
        """A GitHub delivery, and not one of the look-alikes that copy GitHub's headers."""
        view = Headers(headers)
        for lookalike in _LOOKALIKE_EVENT_HEADERS:
            if view.value(lookalike):
                return False
        return view.value(cls.event_header) is not None

    def check_signature(self, payload: bytes, headers: Mapping[str, str]) -> None:
        """Check X-Hub-Signature-256; the SHA-1 header only when allow_sha1 is set."""
        view = Headers(headers)
        self.require_secret()
        if view.value(self.signature_header) is None and view.value(self.legacy_signature_header):
            if not self.allow_sha1:
                raise WebhookError(
                    f"github webhook has only the SHA-1 {self.legacy_signature_header} header; "
                    f"{self.signature_header} (HMAC-SHA256) is required (set allow_sha1 only "
                    f"for servers that cannot send it)",
                    401,
                )
            self.check_hmac(
                payload, view, self.legacy_signature_header, algorithm="sha1", prefix="sha1="
            )
            return
        self.check_hmac(payload, view, self.signature_header)

    def parse_webhook_event(self, headers: Mapping[str, str], payload: dict) -> WebhookEvent:
        """Normalise a push, ping, create or delete delivery; anything else is `other`."""
        view = Headers(headers)
        p = Payload(payload, self.name)
        event = event_name(view, self.event_header, self.name)
        if event == "push":
            return parse_push_payload(p, self.name, prefer_commits=False)
        if event == "ping":
            return WebhookEvent(
                event_type="ping",
                provider=self.name,
                repository=p.text("repository.full_name"),
                pusher=p.text("sender.login"),
                reason="ping: the webhook reached Fraisier; nothing to deploy",
                raw_payload=payload,
            )
        if event in ("create", "delete"):
            return parse_ref_event(p, self.name, event)
        return WebhookEvent(
            event_type="other",
            provider=self.name,
            repository=p.text("repository.full_name"),
            reason=f"{event} events do not deploy",
            raw_payload=payload,
        )

    def load_payload(self, body: bytes, headers: Headers) -> dict[str, Any]:
        """The verified body: JSON, or the form GitHub sends as `payload=<JSON>` when a
        webhook keeps its default content type."""
        if is_form(headers):
            body = form_payload(body, self.name)
        return load_json_object(body, self.name)

    @classmethod
    def sign(
        cls,
        body: bytes,
        secret: str,
        *,
        delivery_id: str | None = None,
        event: str | None = None,
    ) -> dict[str, str]:
        """Headers GitHub sends: both signatures, event and delivery GUID."""
        return {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/fraisier-test",
            cls.event_header: event or "push",
            cls.delivery_header: delivery_id or str(uuid.uuid4()),
            cls.signature_header: "sha256=" + hmac_hex(secret, body, "sha256"),
            cls.legacy_signature_header: "sha1=" + hmac_hex(secret, body, "sha1"),
        }


GitHub = GitHubProvider
