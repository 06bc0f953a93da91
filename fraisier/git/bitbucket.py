"""Bitbucket Cloud and Bitbucket Server / Data Center webhooks.

Both sign with `X-Hub-Signature: sha256=<hex>` (SHA-256, unlike GitHub's header of the
same name) and put the event in X-Event-Key. They differ in event keys, delivery header
(Cloud: X-Request-UUID, Server: X-Request-Id) and payload shape. One delivery may change
several refs; `parse_webhook_events` returns one event per ref.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from .base import (
    ZERO_SHA,
    BuiltinProvider,
    Headers,
    Payload,
    WebhookEvent,
    check_short_ref,
    hmac_hex,
    split_ref,
    validate_delivery_id,
)
from .github import event_name

_SERVER_PREFIXES = ("repo:refs_changed", "diagnostics:", "pr:", "mirror:", "repo:comment:")
_SERVER_KEYS = ("repo:modified", "repo:forked", "repo:secret_detected")
_CLOUD_PREFIXES = ("repo:push", "pullrequest:", "issue:", "repo:commit_", "project:")


def is_server_delivery(headers: Mapping[str, str]) -> bool | None:
    """True for Server/Data Center, False for Cloud, None when not Bitbucket at all."""
    view = Headers(headers)
    key = view.value("X-Event-Key")
    if key is None:
        return None
    if key.startswith(_SERVER_PREFIXES) or key in _SERVER_KEYS:
        return True
    if key.startswith(_CLOUD_PREFIXES):
        return False
    # Proxies often add X-Request-Id to everything, so the Cloud header decides first.
    if view.value("X-Request-UUID") or view.value("X-Hook-UUID"):
        return False
    return view.value("X-Request-Id") is not None


class BitbucketProvider(BuiltinProvider):
    """Bitbucket Cloud; also understands Server/Data Center deliveries sent to it."""

    name = "bitbucket"
    signature_header = "X-Hub-Signature"
    event_header = "X-Event-Key"
    delivery_header = "X-Request-UUID"
    server_delivery_header = "X-Request-Id"
    default_base_url = "https://bitbucket.org"

    @classmethod
    def detect(cls, headers: Mapping[str, str]) -> bool:
        """A Bitbucket Cloud delivery."""
        return is_server_delivery(headers) is False

    def check_signature(self, payload: bytes, headers: Mapping[str, str]) -> None:
        """Check `X-Hub-Signature: sha256=<hex>`."""
        self.check_hmac(payload, headers, self.signature_header)

    def delivery_id(self, headers: Mapping[str, str], body: bytes) -> str:
        """X-Request-UUID (Cloud) or X-Request-Id (Server), else a hash of the body."""
        if is_server_delivery(headers):
            view = Headers(headers)
            value = view.value(self.server_delivery_header)
            if value is not None:
                return validate_delivery_id(
                    value, f"{self.name} webhook {self.server_delivery_header}"
                )
        return super().delivery_id(headers, body)

    def load_payload(self, body: bytes, headers: Headers) -> dict[str, Any]:
        """Decode the body; Server's connection test may come without one."""
        if not body.strip() and headers.value("X-Event-Key") == "diagnostics:ping":
            return {}
        return super().load_payload(body, headers)

    def parse_webhook_event(self, headers: Mapping[str, str], payload: dict) -> WebhookEvent:
        """The first event of the delivery that deploys, else its first event."""
        events = self.parse_webhook_events(headers, payload)
        return next((e for e in events if e.should_deploy), events[0])

    def parse_webhook_events(self, headers: Mapping[str, str], payload: dict) -> list[WebhookEvent]:
        """One event per changed ref (Cloud repo:push, Server repo:refs_changed)."""
        view = Headers(headers)
        key = event_name(view, self.event_header, self.name)
        p = Payload(payload, self.name)
        if key == "diagnostics:ping":
            return [
                WebhookEvent(
                    event_type="ping",
                    provider=self.name,
                    reason="connection test: nothing to deploy",
                    raw_payload=payload,
                )
            ]
        if key == "repo:refs_changed":
            return self._server_changes(p)
        if key == "repo:push":
            return self._cloud_changes(p)
        return [
            WebhookEvent(
                event_type="other",
                provider=self.name,
                repository=p.text("repository.full_name"),
                reason=f"{key} events do not deploy",
                raw_payload=payload,
            )
        ]

    # -- Cloud ------------------------------------------------------------------

    def _cloud_changes(self, p: Payload) -> list[WebhookEvent]:
        changes = p.get("push.changes", list, required=True)
        repository = p.text("repository.full_name")
        common: dict[str, Any] = {
            "provider": self.name,
            "repository": repository,
            "clone_url": self.get_clone_url(repository) if repository else None,
            "pusher": p.text("actor.nickname") or p.text("actor.display_name"),
            "raw_payload": p.data,
        }
        if not changes:
            return [WebhookEvent(event_type="other", reason="push without ref changes", **common)]
        return [self._cloud_change(p, f"push.changes[{i}]", common) for i in range(len(changes))]

    def _cloud_change(self, p: Payload, at: str, common: dict[str, Any]) -> WebhookEvent:
        p.get(at, dict, required=True)
        new = p.get(f"{at}.new", dict)
        old = p.get(f"{at}.old", dict)
        side = new if new is not None else old
        if side is None:
            raise p.error(f"field {at} has neither new nor old")
        where = f"{at}.new" if new is not None else f"{at}.old"
        ref_type = p.text(f"{where}.type", required=True)
        name = p.ref(f"{where}.name", required=True)
        if ref_type == "branch":
            names: dict[str, Any] = {"branch": name}
        elif ref_type in ("tag", "annotated_tag"):
            names = {"tag": name}
        else:
            raise p.error(f"field {where}.type must be 'branch', 'tag' or 'annotated_tag'")
        before = p.sha(f"{at}.old.target.hash") if old is not None else None
        if new is None:
            closed = p.get(f"{at}.closed", bool)
            if closed is False:
                raise p.error(f"field {at} has new: null but closed is false")
            event_type = "branch_delete" if "branch" in names else "other"
            return WebhookEvent(
                event_type=event_type,
                is_deletion=True,
                before=before,
                reason=f"{ref_type} {name} was deleted; nothing to deploy",
                **names,
                **common,
            )
        return WebhookEvent(
            event_type="push" if "branch" in names else "tag_push",
            commit=p.sha(f"{at}.new.target.hash", required=True),
            commit_message=p.text(f"{at}.new.target.message"),
            before=before,
            **names,
            **common,
        )

    # -- Server / Data Center ---------------------------------------------------

    def _server_changes(self, p: Payload) -> list[WebhookEvent]:
        changes = p.get("changes", list, required=True)
        project = p.text("repository.project.key")
        slug = p.text("repository.slug")
        repository = f"{project}/{slug}" if project and slug else slug
        common: dict[str, Any] = {
            "provider": self.name,
            "repository": repository,
            "clone_url": self._server_clone_url(p),
            "pusher": p.text("actor.name") or p.text("actor.slug"),
            "raw_payload": p.data,
        }
        if not changes:
            return [WebhookEvent(event_type="other", reason="push without ref changes", **common)]
        return [self._server_change(p, f"changes[{i}]", common) for i in range(len(changes))]

    def _server_change(self, p: Payload, at: str, common: dict[str, Any]) -> WebhookEvent:
        p.get(at, dict, required=True)
        ref = p.ref(f"{at}.refId", required=True)
        branch, tag = split_ref(ref)
        check_short_ref(branch or tag, p.where(f"{at}.refId"))
        change = p.text(f"{at}.type", required=True)
        if change not in ("ADD", "UPDATE", "DELETE"):
            raise p.error(f"field {at}.type must be ADD, UPDATE or DELETE")
        to_hash = p.sha(f"{at}.toHash", required=True)
        from_hash = p.sha(f"{at}.fromHash")
        names = {"ref": ref, "branch": branch, "tag": tag, "before": from_hash}
        if change == "DELETE" or to_hash == ZERO_SHA:
            event_type = "branch_delete" if branch is not None else "other"
            return WebhookEvent(
                event_type=event_type,
                is_deletion=True,
                reason=f"{ref} was deleted; nothing to deploy",
                **names,
                **common,
            )
        if branch is None and tag is None:
            return WebhookEvent(
                event_type="other",
                commit=to_hash,
                reason=f"ref {ref} is neither a branch nor a tag",
                **names,
                **common,
            )
        return WebhookEvent(
            event_type="push" if branch is not None else "tag_push",
            commit=to_hash,
            **names,
            **common,
        )

    def _server_clone_url(self, p: Payload) -> str | None:
        links = p.get("repository.links.clone", list) or []
        found: dict[str, str] = {}
        for index in range(len(links)):
            name = p.text(f"repository.links.clone[{index}].name")
            href = p.text(f"repository.links.clone[{index}].href")
            if name and href:
                found.setdefault(name, href)
        return found.get("http") or found.get("https") or found.get("ssh")

    @classmethod
    def sign(
        cls,
        body: bytes,
        secret: str,
        *,
        delivery_id: str | None = None,
        event: str | None = None,
    ) -> dict[str, str]:
        """Headers Bitbucket Cloud sends."""
        return {
            "Content-Type": "application/json",
            "User-Agent": "Bitbucket-Webhooks/2.0",
            cls.event_header: event or "repo:push",
            cls.delivery_header: delivery_id or str(uuid.uuid4()),
            "X-Hook-UUID": str(uuid.uuid4()),
            "X-Attempt-Number": "1",
            cls.signature_header: "sha256=" + hmac_hex(secret, body, "sha256"),
        }


class BitbucketServerProvider(BitbucketProvider):
    """Bitbucket Server and Data Center (self-hosted)."""

    name = "bitbucket-server"
    delivery_header = "X-Request-Id"
    default_base_url = ""

    @classmethod
    def detect(cls, headers: Mapping[str, str]) -> bool:
        """A Bitbucket Server / Data Center delivery."""
        return is_server_delivery(headers) is True

    @classmethod
    def sign(
        cls,
        body: bytes,
        secret: str,
        *,
        delivery_id: str | None = None,
        event: str | None = None,
    ) -> dict[str, str]:
        """Headers Bitbucket Server / Data Center sends."""
        return {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Atlassian HttpClient",
            cls.event_header: event or "repo:refs_changed",
            cls.delivery_header: delivery_id or str(uuid.uuid4()),
            cls.signature_header: "sha256=" + hmac_hex(secret, body, "sha256"),
        }


Bitbucket = BitbucketProvider
BitbucketServer = BitbucketServerProvider
