"""Who may sign (the caller allow-list) and the record of what was signed (the audit)."""

from __future__ import annotations

from pathlib import Path

from ..callers import CallerPolicy
from .files import Values
from .model import AuditSettings


def caller_policy(values: Values) -> CallerPolicy | None:
    uids: frozenset[int] = values.parse("ALLOWED_UIDS")
    gids: frozenset[int] = values.parse("ALLOWED_GIDS")
    return CallerPolicy(uids, gids) if uids or gids else None


def audit_settings(values: Values) -> AuditSettings | None:
    """None when the audit is off; its other settings are only read when it is on."""
    target: str | None = values.parse("AUDIT")
    if target is None:
        return None
    fail: str = values.parse("AUDIT_FAIL")
    key_file: Path | None = values.parse("AUDIT_KEY_FILE")
    return AuditSettings(target=target, fail_closed=fail == "closed", key_file=key_file)
