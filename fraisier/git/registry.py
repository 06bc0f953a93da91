"""Registry of Git providers: built-in ones plus whatever users register."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from fraisier.errors import WebhookError

from .base import GitProvider, Headers, WebhookEvent
from .bitbucket import BitbucketProvider, BitbucketServerProvider
from .gitea import ForgejoProvider, GiteaProvider
from .github import GitHubProvider
from .gitlab import GitLabProvider

P = TypeVar("P", bound=type[GitProvider])

# Look-alikes first: Forgejo also sends Gitea's headers, both also send GitHub's.
_BUILTINS: tuple[type[GitProvider], ...] = (
    ForgejoProvider,
    GiteaProvider,
    GitLabProvider,
    BitbucketServerProvider,
    BitbucketProvider,
    GitHubProvider,
)
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

_providers: dict[str, type[GitProvider]] = {cls.name: cls for cls in _BUILTINS}
# _detection_order() of the current registry; every delivery asks for it.
_order: tuple[type[GitProvider], ...] | None = None


def register_provider(provider_class: P, name: str | None = None) -> P:
    """Register a GitProvider subclass under `name` (default: its `name`); usable as decorator.

    A registered provider is tried by `detect_provider` before the built-in ones, and one
    registered under a built-in's name replaces it.
    """
    if not (isinstance(provider_class, type) and issubclass(provider_class, GitProvider)):
        raise TypeError(f"register_provider needs a GitProvider subclass, got {provider_class!r}")
    key = name or provider_class.name
    if not isinstance(key, str) or not _NAME_RE.fullmatch(key):
        raise ValueError(
            f"provider name {key!r} must be 1-64 lowercase letters, digits, '.', '_' or '-'; "
            f"set `name` on {provider_class.__name__}"
        )
    if name is not None and provider_class.name != name:
        # Events report the name the provider is known by.
        provider_class = type(provider_class.__name__, (provider_class,), {"name": name})
    global _order
    _providers.pop(key, None)
    _providers[key] = provider_class
    _order = None
    return provider_class


def unregister_provider(name: str) -> None:
    """Forget a provider; a built-in one comes back under its own name."""
    global _order
    _providers.pop(name, None)
    for cls in _BUILTINS:
        if cls.name == name:
            _providers[name] = cls
    _order = None


def list_providers() -> list[str]:
    """Names of every registered provider, in detection order."""
    return [cls.name for cls in _detection_order()]


def get_provider_class(name: str) -> type[GitProvider]:
    """The class registered under `name`; WebhookError(400) when unknown."""
    try:
        return _providers[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_providers))
        raise WebhookError(
            f"unknown git provider {name!r}; known providers: {known}", 400
        ) from None


def get_provider(name: str, config: Mapping[str, Any] | None = None, **options: Any) -> GitProvider:
    """A provider instance configured with `config` (webhook_secret, allow_sha1, base_url)."""
    return get_provider_class(name)(config, **options)


def detect_provider(headers: Mapping[str, Any]) -> str | None:
    """Name of the provider whose headers these are, or None."""
    view = Headers(headers)
    for cls in _detection_order():
        if cls.detect(view):
            return cls.name
    return None


def _detection_order() -> tuple[type[GitProvider], ...]:
    global _order
    order = _order
    if order is None:
        builtin = [cls for cls in _BUILTINS if _providers.get(cls.name) is cls]
        custom = [cls for cls in _providers.values() if cls not in _BUILTINS]
        order = _order = (*reversed(custom), *builtin)
    return order


def handle_webhook_all(
    body: bytes,
    headers: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    *,
    provider: str | None = None,
    **options: Any,
) -> list[WebhookEvent]:
    """Detect (unless `provider` is given), verify and parse a delivery into its events."""
    name = provider or detect_provider(headers)
    if name is None:
        raise WebhookError(
            "webhook provider not recognised from the headers; known providers: "
            + ", ".join(list_providers()),
            400,
        )
    return get_provider(name, config, **options).handle_all(body, headers)


def handle_webhook(
    body: bytes,
    headers: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    *,
    provider: str | None = None,
    **options: Any,
) -> WebhookEvent:
    """Detect, verify and parse a delivery; the first event that deploys, else the first."""
    events = handle_webhook_all(body, headers, config, provider=provider, **options)
    return next((e for e in events if e.should_deploy), events[0])
