"""Running under systemd: sockets it passes (socket activation) and what it is told
(readiness notification), both by their documented wire contracts, no library.

Socket activation (sd_listen_fds): when LISTEN_PID is this process and LISTEN_FDS is N,
descriptors 3..3+N-1 are listening sockets, named in LISTEN_FDNAMES (colon-separated, from
`FileDescriptorName=`). Those named `signing` (every one, when none is named) serve signing,
the one named `ops` the ops app. The variables are removed once read, so nothing started
later takes the sockets for its own.

Notification (sd_notify): datagrams of `KEY=value` lines to the unix socket NOTIFY_SOCKET
names (a leading `@` is the abstract namespace). `READY=1` when every product has a usable
secret, `STATUS=` a line about them, `STOPPING=1` when a graceful shutdown starts, and
`WATCHDOG=1` every WATCHDOG_USEC/2 while the event loop turns. Forty lines over a socket
need no dependency: `sdnotify` is unmaintained, `systemd-python` needs libsystemd to build.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field

from .errors import ConfigError

log = logging.getLogger(__name__)

FIRST_FD = 3  # SD_LISTEN_FDS_START
SIGNING, OPS = "signing", "ops"
STATUS_INTERVAL = 1.0  # how often the status line is brought up to date, at most
READY_POLL = 0.1  # how soon READY=1 follows readiness


def activation_pending(env: Mapping[str, str]) -> bool:
    """Whether systemd passed this process listening sockets (read without taking them)."""
    return env.get("LISTEN_PID") == str(os.getpid()) and _fd_count(env) > 0


def _fd_count(env: Mapping[str, str]) -> int:
    try:
        return max(0, int(env.get("LISTEN_FDS", "0")))
    except ValueError:
        return 0


@dataclass
class PassedSockets:
    """The listening sockets systemd handed over, by the job each is for."""

    tcp: socket.socket | None = None  # signing on a loopback TCP socket
    unix: socket.socket | None = None  # signing on a unix socket
    ops: socket.socket | None = None
    ignored: list[str] = field(default_factory=list)  # names of sockets with no job here


def take_passed_sockets(env: MutableMapping[str, str]) -> PassedSockets | None:
    """The sockets passed to this process, or None; removes the LISTEN_* variables."""
    if not activation_pending(env):
        return None
    count = _fd_count(env)
    names_raw = env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    names = names_raw.split(":") if names_raw else [SIGNING] * count
    if len(names) != count:
        raise ConfigError(f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS is {count}")
    passed = PassedSockets()
    for fd, name in zip(range(FIRST_FD, FIRST_FD + count), names, strict=True):
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        if name == OPS:
            _check_stream(sock, name)
            if passed.ops is not None:
                raise ConfigError("systemd passed more than one socket named ops")
            passed.ops = sock
        elif name == SIGNING:
            _check_stream(sock, name)
            _take_signing(passed, sock)
        else:
            passed.ignored.append(name)
            sock.close()
    return passed


def _check_stream(sock: socket.socket, name: str) -> None:
    if sock.type != socket.SOCK_STREAM or sock.family not in (
        socket.AF_UNIX,
        socket.AF_INET,
        socket.AF_INET6,
    ):
        raise ConfigError(
            f"the socket systemd passed as {name} is not a stream socket "
            "(use ListenStream= in the socket unit)"
        )


def _take_signing(passed: PassedSockets, sock: socket.socket) -> None:
    if sock.family == socket.AF_UNIX:
        if passed.unix is not None:
            raise ConfigError("systemd passed more than one unix socket for signing")
        passed.unix = sock
        return
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host).is_loopback:
        raise ConfigError(
            f"the TCP socket systemd passed for signing is bound to {host}:{port}; signing "
            "is loopback-only (ListenStream=127.0.0.1:PORT or a unix socket path)"
        )
    if passed.tcp is not None:
        raise ConfigError("systemd passed more than one TCP socket for signing")
    passed.tcp = sock


class Notifier:
    """sd_notify: best-effort datagrams to NOTIFY_SOCKET; does nothing when it is unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *lines: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or the socket full: nothing to do about it
            log.debug("cannot notify systemd", extra={"error": exc.strerror})

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process."""
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def keep_systemd_informed(
    notifier: Notifier, ready: Callable[[], bool], status: Callable[[], str]
) -> None:
    """READY=1 once `ready()`, STATUS= whenever the line changes, WATCHDOG=1 on time; runs
    until cancelled. The watchdog pings come from this task, so they stop when the loop
    stops turning."""
    loop = asyncio.get_running_loop()
    told_ready, said = False, ""
    next_status = next_ping = loop.time()
    while True:
        now = loop.time()
        if not told_ready and ready():
            said = status()
            notifier.send("READY=1", f"STATUS={said}")
            told_ready, next_status = True, now + STATUS_INTERVAL
        elif now >= next_status:
            line = status()
            if line != said:
                notifier.send(f"STATUS={line}")
                said = line
            next_status = now + STATUS_INTERVAL
        if notifier.watchdog is not None and now >= next_ping:
            notifier.send("WATCHDOG=1")
            next_ping = now + notifier.watchdog
        wake = next_status if told_ready else now + READY_POLL
        if notifier.watchdog is not None:
            wake = min(wake, next_ping)
        await asyncio.sleep(max(0.0, wake - loop.time()))
