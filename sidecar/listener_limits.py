"""How far each listener lets its clients go: connection caps, timeouts, and the share of
the open-file limit the signing listeners may use. A leaf: `server` sizes the listeners
with it before any exists, `listener` enforces what it says.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

FD_RESERVE = 64  # descriptors kept for Vault connections, files and the resolver
#: the share of a signing listener's connections one caller may hold (one uid; every peer
#: the kernel could not name counts as one caller) unless the allow-list names it: one local
#: user cannot fill the listener, and the rest is left to the others
CALLER_SHARE = 0.5


@dataclass(frozen=True)
class Limits:
    """How far one listener lets its clients go."""

    max_connections: int
    #: a connection idle after a response, or not done sending its request head, this long
    #: after connecting or answering is closed
    idle_timeout: float
    #: after an early answer (413, 408), how long the rest of the body is read and dropped
    lingering_time: float
    backlog: int = 128
    #: the share of max_connections one caller may hold; None: callers are not told apart
    #: (the ops listener, whose peers are all over the cluster)
    caller_share: float | None = None

    @property
    def max_per_caller(self) -> int | None:
        if self.caller_share is None:
            return None
        return max(1, int(self.max_connections * self.caller_share))


OPS_LIMITS = Limits(max_connections=32, idle_timeout=5.0, lingering_time=0.0)
#: shared by the signing listeners (TCP and unix socket split it evenly)
SIGNING_LIMITS = Limits(
    max_connections=256, idle_timeout=10.0, lingering_time=2.0, caller_share=CALLER_SHARE
)


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (many runtimes start at 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def signing_limits(fd_limit: int, listeners: int) -> Limits:
    """Each signing listener's share of SIGNING_LIMITS, smaller still if every listener at
    its cap would run out of file descriptors."""
    share = SIGNING_LIMITS.max_connections // max(1, listeners)
    fits = (fd_limit - FD_RESERVE - OPS_LIMITS.max_connections) // max(1, listeners)
    if fits < share:
        share = max(16, fits)
        log.warning(
            "open-file limit is low: signing connections capped lower",
            extra={"detail": f"RLIMIT_NOFILE {fd_limit}: {share} per signing listener"},
        )
    return dataclasses.replace(SIGNING_LIMITS, max_connections=share)
