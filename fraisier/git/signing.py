"""Sign a webhook body the way a provider does: for tests, benchmarks and setup checks.

headers = sign_headers("github", body, "s3cret", delivery_id="d-1", event="push")
client.post("/webhook", data=body, headers=headers)
"""

from __future__ import annotations

from .base import hmac_hex
from .registry import get_provider_class

__all__ = ["hmac_hex", "sign_headers"]


def sign_headers(
    provider: str,
    body: bytes | str,
    secret: str,
    delivery_id: str | None = None,
    event: str | None = None,
) -> dict[str, str]:
    """Headers `provider` would send with `body` signed by `secret`.

    `event` is in the provider's own words ("push", "Tag Push Hook", "repo:refs_changed");
    each provider defaults to its push event. `delivery_id` defaults to a fresh UUID.
    """
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    return get_provider_class(provider).sign(raw, secret, delivery_id=delivery_id, event=event)
