"""The small exception hierarchy the rest of the package speaks.

Messages are written for operators: they say what failed and what to do, and never
carry a secret, a token or a credential.
"""


class SidecarError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SidecarError):
    """A configuration value is wrong; the message names the variable or key."""


class SourceError(SidecarError):
    """A secret source could not produce a usable secret (the last good one stays in use)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SecretInvalid(SourceError):
    """The source answered, but its content is not a usable secret (fields missing, bad JSON)."""


class SecretUnavailable(SourceError):
    """The source could not be reached or read (file missing, Vault down or refusing)."""


class VaultAuthError(SourceError):
    """Vault refused our credentials (login failed, token revoked, permission denied)."""
