"""Who is calling: the kernel's credentials of a unix-socket peer, and the allow-list.

Any process in the pod can reach loopback, so the header checks stop browsers and SSRF but
not a compromised neighbour container. On the unix socket the kernel says who the peer is
(SO_PEERCRED: uid, gid and pid at connect time, unforgeable); the allow-list admits a
caller whose uid is listed OR whose gid is listed, like a file's owner and group modes.
A TCP peer cannot be identified this way, so with a list set it is refused.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from aiohttp import web

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel


@dataclass(frozen=True, slots=True)
class Caller:
    """A unix-socket peer as the kernel saw it when it connected."""

    uid: int
    gid: int
    pid: int

    def as_json(self) -> dict[str, int]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid}


def peer_credentials(sock: socket.socket | None) -> Caller | None:
    """SO_PEERCRED of a connected unix socket; None for any other socket (TCP)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Caller(uid=uid, gid=gid, pid=pid)


def caller_of(request: web.BaseRequest) -> Caller | None:
    """The credentials the listener read once when the request's connection was made."""
    caller = getattr(request.protocol, "caller", None)
    return caller if isinstance(caller, Caller) else None


@dataclass(frozen=True)
class CallerPolicy:
    """The allow-list: uids and gids that may sign. Built only when one of them is set."""

    uids: frozenset[int]
    gids: frozenset[int]

    def allows(self, caller: Caller | None) -> bool:
        """A caller the kernel identified, whose uid or gid is listed."""
        return caller is not None and (caller.uid in self.uids or caller.gid in self.gids)

    def describe(self) -> str:
        uids = ",".join(map(str, sorted(self.uids))) or "-"
        gids = ",".join(map(str, sorted(self.gids))) or "-"
        return f"uids {uids}; gids {gids}"
