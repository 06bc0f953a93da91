"""Git providers: detect a webhook's sender, verify its signature, parse the push.

Custom providers plug in the same way as the built-in ones::

    from fraisier.git import GitProvider, WebhookEvent, register_provider
"""

from .base import EVENT_TYPES, GitProvider, Headers, WebhookEvent, validate_ref_name, validate_sha
from .bitbucket import BitbucketProvider, BitbucketServerProvider
from .gitea import ForgejoProvider, GiteaProvider
from .github import GitHubProvider
from .gitlab import GitLabProvider
from .registry import (
    detect_provider,
    get_provider,
    get_provider_class,
    handle_webhook,
    handle_webhook_all,
    list_providers,
    register_provider,
    unregister_provider,
)
from .signing import sign_headers

__all__ = [
    "EVENT_TYPES",
    "BitbucketProvider",
    "BitbucketServerProvider",
    "ForgejoProvider",
    "GitHubProvider",
    "GitLabProvider",
    "GitProvider",
    "GiteaProvider",
    "Headers",
    "WebhookEvent",
    "detect_provider",
    "get_provider",
    "get_provider_class",
    "handle_webhook",
    "handle_webhook_all",
    "list_providers",
    "register_provider",
    "sign_headers",
    "unregister_provider",
    "validate_ref_name",
    "validate_sha",
]
