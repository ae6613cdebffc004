"""Who is calling: the kernel's credentials of a unix-socket peer, and the allow-list.

Any process in the pod can reach loopback, so the header checks stop browsers and SSRF but
not a compromised neighbour container. On the unix socket the kernel says who the peer is
(SO_PEERCRED: uid, gid and pid at connect time, unforgeable); the allow-list admits a
caller whose uid is listed OR whose gid is listed, like a file's owner and group modes.

A TCP peer on loopback is in the same network namespace (a pod's), so the kernel's
socket table knows it too: a NETLINK_SOCK_DIAG (inet_diag) lookup of the peer's 4-tuple
gives the uid that owns the peer's socket (no gid, no pid). A peer that cannot be looked
up (netlink refused, socket already gone or closed by its process) is unidentified, and
refused by any list.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
from dataclasses import dataclass
from typing import Any

from aiohttp import web

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id" to the kernel


@dataclass(frozen=True, slots=True)
class Caller:
    """A peer as the kernel saw it when it connected; gid and pid are None on TCP."""

    uid: int
    gid: int | None
    pid: int | None

    def as_json(self) -> dict[str, int | str]:
        if self.gid is None or self.pid is None:
            return {"uid": self.uid, "via": "tcp"}
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


# inet_diag (linux/inet_diag.h): a request for one socket by its exact 4-tuple.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_DIAG_REQ = struct.Struct("=BBBBI")  # family, protocol, extensions, pad, states
_DIAG_ID = struct.Struct("!HH16s16s")  # source port, destination port, addresses
_DIAG_ID_TAIL = struct.Struct("=III")  # interface, cookie (none: all ones)
# The lookup's interface: a socket bound to a device (SO_BINDTODEVICE, `curl --interface lo`)
# matches only a lookup on that device, an unbound one any. The signing listener is loopback
# only, so every peer is on lo, whose index is 1 in every network namespace.
_LOOPBACK_INDEX = 1
_DIAG_STATE_OFFSET = 1  # in inet_diag_msg
_DIAG_UID_OFFSET = 64
_DIAG_INODE_OFFSET = 68
# Full sockets only: a TIME_WAIT or SYN_RECV entry is not owned by anyone and reads uid 0.
# ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING
_OWNED_STATES = frozenset({1, 4, 5, 8, 9, 11})
DIAG_TIMEOUT = 0.5  # the kernel answers at once; this only bounds a broken netlink


class TcpPeers:
    """Owners of loopback TCP peers' sockets, from the kernel's socket table."""

    def __init__(self) -> None:
        self._netlink: socket.socket | None = None
        self._seq = itertools.count(1)

    def _socket(self) -> socket.socket:
        if self._netlink is None:
            netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
            netlink.settimeout(DIAG_TIMEOUT)
            self._netlink = netlink
        return self._netlink

    def uid(self, sock: Any) -> int | None:
        """The uid owning the other end of connected TCP socket `sock`, or None."""
        try:
            family = sock.family
            peer, local = sock.getpeername(), sock.getsockname()
            sockid = _DIAG_ID.pack(
                peer[1],
                local[1],
                socket.inet_pton(family, peer[0]).ljust(16, b"\0"),
                socket.inet_pton(family, local[0]).ljust(16, b"\0"),
            )
            body = (
                _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
                + sockid
                + _DIAG_ID_TAIL.pack(_LOOPBACK_INDEX, 0xFFFFFFFF, 0xFFFFFFFF)
            )
            seq = next(self._seq) & 0xFFFFFFFF
            netlink = self._socket()
            netlink.send(
                _NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0)
                + body
            )
            while True:  # skip a late answer to an earlier, timed-out question
                data = netlink.recv(8192)
                _, kind, _, answered, _ = _NLMSG.unpack_from(data)
                if answered == seq:
                    break
        except (OSError, ValueError, IndexError, struct.error):
            self.close()  # a fresh netlink socket next time
            return None
        if kind == _NLMSG_ERROR or len(data) < _NLMSG.size + _DIAG_INODE_OFFSET + 4:
            return None
        if data[_NLMSG.size + _DIAG_STATE_OFFSET] not in _OWNED_STATES:
            return None
        uid, inode = struct.unpack_from("=II", data, _NLMSG.size + _DIAG_UID_OFFSET)
        # Inode 0: no process holds the socket any more. A peer that closed right after
        # sending leaves an orphan (FIN_WAIT1, or FIN_WAIT2 kept as a timewait entry that
        # reads uid 0): whoever made it is gone from the table, so it is nobody's.
        return None if inode == 0 else int(uid)

    def close(self) -> None:
        if self._netlink is not None:
            with contextlib.suppress(OSError):
                self._netlink.close()
            self._netlink = None


def identify(sock: Any, tcp_peers: TcpPeers) -> Caller | None:
    """The peer of a new connection: SO_PEERCRED on a unix socket, inet_diag on TCP."""
    if sock is None:
        return None
    if sock.family == socket.AF_UNIX:
        return peer_credentials(sock)
    uid = tcp_peers.uid(sock)
    return None if uid is None else Caller(uid=uid, gid=None, pid=None)


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
        return caller is not None and (
            caller.uid in self.uids or (caller.gid is not None and caller.gid in self.gids)
        )

    def describe(self) -> str:
        uids = ",".join(map(str, sorted(self.uids))) or "-"
        gids = ",".join(map(str, sorted(self.gids))) or "-"
        return f"uids {uids}; gids {gids}"
