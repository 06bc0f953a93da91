"""Gitea and Forgejo webhooks.

Both also send GitHub's headers (X-GitHub-Event, X-Hub-Signature-256), so they must be
detected before GitHub. With no secret set they send the signature headers empty, which
counts as unsigned.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from .base import BuiltinProvider, Headers, Payload, WebhookEvent, hmac_hex
from .github import event_name, parse_push_payload, parse_ref_event


class GiteaProvider(BuiltinProvider):
    """Gitea (self-hosted)."""

    name = "gitea"
    header_prefix = "X-Gitea"
    signature_header = "X-Gitea-Signature"
    event_header = "X-Gitea-Event"
    delivery_header = "X-Gitea-Delivery"
    default_base_url = "http://localhost:3000"

    def check_signature(self, payload: bytes, headers: Mapping[str, str]) -> None:
        """Check the bare-hex HMAC-SHA256 in the provider's own signature header."""
        self.check_hmac(payload, headers, self.signature_header, prefix=None)

    def parse_webhook_event(self, headers: Mapping[str, str], payload: dict) -> WebhookEvent:
        """Normalise push (including the all-zero test delivery), create and delete."""
        view = Headers(headers)
        p = Payload(payload, self.name)
        event = event_name(view, self.event_header, self.name)
        if event == "push":
            return parse_push_payload(
                p,
                self.name,
                prefer_commits=True,
                default_clone_url=self._clone_url_of(p),
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

    def _clone_url_of(self, p: Payload) -> str | None:
        full_name = p.text("repository.full_name")
        if full_name and self.config.get("base_url"):
            return self.get_clone_url(full_name)
        return None

    @classmethod
    def sign(
        cls,
        body: bytes,
        secret: str,
        *,
        delivery_id: str | None = None,
        event: str | None = None,
    ) -> dict[str, str]:
        """Headers Gitea sends, including its GitHub and Gogs look-alike headers."""
        delivery = delivery_id or str(uuid.uuid4())
        digest = hmac_hex(secret, body, "sha256")
        kind = event or "push"
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": kind,
            "X-GitHub-Event-Type": kind,
            "X-GitHub-Delivery": delivery,
            "X-Hub-Signature": "sha1=" + hmac_hex(secret, body, "sha1"),
            "X-Hub-Signature-256": "sha256=" + digest,
            "X-Gogs-Event": kind,
            "X-Gogs-Event-Type": kind,
            "X-Gogs-Delivery": delivery,
            "X-Gogs-Signature": digest,
            "X-Gitea-Event": kind,
            "X-Gitea-Event-Type": kind,
            "X-Gitea-Delivery": delivery,
            "X-Gitea-Signature": digest,
        }
        if cls.header_prefix != "X-Gitea":
            headers[cls.event_header] = kind
            headers[f"{cls.header_prefix}-Event-Type"] = kind
            headers[cls.delivery_header] = delivery
            headers[cls.signature_header] = digest
        return headers


class ForgejoProvider(GiteaProvider):
    """Forgejo: Gitea's dialect under its own X-Forgejo-* headers."""

    name = "forgejo"
    header_prefix = "X-Forgejo"
    signature_header = "X-Forgejo-Signature"
    event_header = "X-Forgejo-Event"
    delivery_header = "X-Forgejo-Delivery"


Gitea = GiteaProvider
Forgejo = ForgejoProvider
