"""The one error tree of Fraisier.

Every message says what was wrong, where (key path, file, host) and what to do,
so that the CLI can print it on one line and the web API can return it as JSON.
"""

from __future__ import annotations


class FraisierError(Exception):
    """Base of every error Fraisier reports to a user."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        """JSON form used by the web API and `--json` output."""
        return {"error": type(self).__name__, "message": self.message}


class ConfigError(FraisierError):
    """fraises.yaml cannot be read, parsed or validated, or a value it needs is missing."""

    http_status = 500


class NotFoundError(FraisierError):
    """An unknown fraise, environment, deployment or release was named."""

    http_status = 404


class StoreError(FraisierError):
    """The deployment store cannot be opened, migrated or written."""

    http_status = 503


class DeployError(FraisierError):
    """A deployment could not be started or carried out."""

    http_status = 409


class LockedError(DeployError):
    """Another deployment of the same fraise and environment holds the lock."""


class SourceError(DeployError):
    """The repository could not be fetched or the commit resolved."""


class WebhookError(FraisierError):
    """A webhook delivery was refused; carries the HTTP status to answer with."""

    def __init__(self, message: str, http_status: int = 400):
        super().__init__(message)
        self.http_status = http_status
