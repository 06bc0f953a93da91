"""GitLab (gitlab.com and self-managed) webhooks.

GitLab does not sign the body: it sends the secret itself in X-Gitlab-Token, compared
here in constant time. Idempotency-Key stays the same across retries and is the delivery
id; X-Gitlab-Event-UUID changes per attempt and is not.
"""

from __future__ import annotations

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
    split_ref,
)

_KINDS = {"Push Hook": "push", "Tag Push Hook": "tag_push"}


class GitLabProvider(BuiltinProvider):
    """GitLab."""

    name = "gitlab"
    signature_header = "X-Gitlab-Token"
    event_header = "X-Gitlab-Event"
    delivery_header = "Idempotency-Key"
    default_base_url = "https://gitlab.com"

    def check_signature(self, payload: bytes, headers: Mapping[str, str]) -> None:
        """Compare X-Gitlab-Token with the configured secret(s) in constant time."""
        self.require_secret()
        token = Headers(headers).get(self.signature_header)
        if token is None:
            raise WebhookError(f"gitlab webhook {self.signature_header} header is missing", 401)
        if not token:
            raise WebhookError(f"gitlab webhook {self.signature_header} header is empty", 401)
        if not self.token_matches(token):
            raise WebhookError(
                f"gitlab webhook {self.signature_header} does not match the configured secret; "
                f"set the same secret token on both sides",
                401,
            )

    def parse_webhook_event(self, headers: Mapping[str, str], payload: dict) -> WebhookEvent:
        """Normalise a Push Hook or Tag Push Hook (also as a System Hook)."""
        view = Headers(headers)
        p = Payload(payload, self.name)
        event = view.value(self.event_header)
        if event is None:
            raise WebhookError(f"gitlab webhook {self.event_header} header is missing", 400)
        kind = _KINDS.get(event)
        object_kind = p.text("object_kind")
        if kind is None and event == "System Hook" and object_kind in ("push", "tag_push"):
            kind = object_kind
        if kind is None:
            return WebhookEvent(
                event_type="other",
                provider=self.name,
                repository=p.text("project.path_with_namespace"),
                reason=f"GitLab {object_kind or 'unknown'} events do not deploy",
                raw_payload=payload,
            )
        return self._parse_push(p, kind)

    def _parse_push(self, p: Payload, kind: str) -> WebhookEvent:
        ref = p.ref("ref", required=True)
        branch, tag = split_ref(ref)
        check_short_ref(branch or tag, p.where("ref"))
        after = p.sha("after", required=True)
        before = p.sha("before")
        # For an annotated tag `after` is the tag object; checkout_sha is the commit.
        checkout = p.sha("checkout_sha")
        common: dict[str, Any] = {
            "provider": self.name,
            "ref": ref,
            "branch": branch,
            "tag": tag,
            "before": before,
            "repository": p.text("project.path_with_namespace"),
            "clone_url": p.text("project.git_http_url") or p.text("repository.git_http_url"),
            "pusher": p.text("user_username") or p.text("user_name"),
            "raw_payload": p.data,
        }
        if after == ZERO_SHA:
            if branch is not None:
                event_type, what = "branch_delete", f"branch {branch} was deleted"
            else:
                event_type, what = "other", f"{'tag ' + tag if tag else 'ref ' + ref} was deleted"
            return WebhookEvent(
                event_type=event_type,
                is_deletion=True,
                reason=f"{what}; nothing to deploy",
                **common,
            )
        commit = checkout or after
        message = p.listed_message("commits", commit)
        if branch is None and tag is None:
            return WebhookEvent(
                event_type="other",
                commit=commit,
                commit_message=message,
                reason=f"ref {ref} is neither a branch nor a tag",
                **common,
            )
        event_type = "tag_push" if tag is not None else "push"
        if kind != event_type:
            raise p.error(f"says {kind} but its ref {ref} is a {'tag' if tag else 'branch'}")
        return WebhookEvent(event_type=event_type, commit=commit, commit_message=message, **common)

    @classmethod
    def sign(
        cls,
        body: bytes,
        secret: str,
        *,
        delivery_id: str | None = None,
        event: str | None = None,
    ) -> dict[str, str]:
        """Headers GitLab sends: the token itself, the event and the idempotency key."""
        return {
            "Content-Type": "application/json",
            "User-Agent": "GitLab/fraisier-test",
            cls.event_header: event or "Push Hook",
            cls.signature_header: secret,
            cls.delivery_header: delivery_id or str(uuid.uuid4()),
            "X-Gitlab-Event-UUID": str(uuid.uuid4()),
            "X-Gitlab-Webhook-UUID": str(uuid.uuid4()),
            "X-Gitlab-Instance": "https://gitlab.example.org",
        }


GitLab = GitLabProvider
