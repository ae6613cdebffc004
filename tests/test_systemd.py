"""Under systemd's contracts without systemd as PID 1: sockets passed the way a socket unit
passes them (systemd's own `systemd-socket-activate` binds them, waits for the first
connection and execs the sidecar with LISTEN_*), readiness told over NOTIFY_SOCKET, and
`reditus-sidecar ready`. The real service manager runs in tests/test_systemd_units.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.systemd import Notifier, take_passed_sockets

from .support import (
    ROOT,
    TEST_SECRET,
    base_env,
    eventually,
    free_port,
    open_socket_dir,
    post_token,
    run_sidecar,
    sign_as,
    sign_on_socket,
    signed_with,
    spawn,
    wait_http,
    write_secret,
)

pytestmark = pytest.mark.integration


class NotifySocket:
    """The datagram socket systemd listens on for sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)
        self.messages: list[str] = []

    def next(self) -> str:
        message = self.sock.recv(4096).decode()
        self.messages.append(message)
        return message

    def until(self, line: str) -> list[str]:
        """Messages up to and including the first holding `line`."""
        seen = []
        while True:
            message = self.next()
            seen.append(message)
            if line in message.split("\n"):
                return seen

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def activated(
    tmp_path: Path, listen: list[str], names: str, **env: str
) -> Iterator[tuple[subprocess.Popen[str], list[str], NotifySocket]]:
    """`systemd-socket-activate` holding the sockets in `listen`, named `names`, that
    starts the sidecar at the first connection; NOTIFY_SOCKET points at the test."""
    notify = NotifySocket(tmp_path / "notify.sock")
    secret_file = tmp_path / "secret.json"
    full = base_env(
        REDITUS_SIDECAR_SECRET_SOURCE="file",
        REDITUS_SIDECAR_SECRET_FILE=str(secret_file),
        REDITUS_SIDECAR_REFRESH_INTERVAL="1",
        REDITUS_SIDECAR_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        NOTIFY_SOCKET=str(notify.path),
        **env,
    )
    wrapper = ["systemd-socket-activate", f"--fdname={names}"]
    for address in listen:
        wrapper += ["-l", address]
    for key in full:  # it hands the command only the variables named here
        wrapper += ["-E", key]
    proc, lines = spawn(["serve"], full, wrapper)
    try:
        eventually(
            lambda: sum(line.startswith("Listening on") for line in lines) == len(listen),
            what="systemd-socket-activate listening",
        )
        yield proc, lines, notify
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        notify.close()


def test_a_passed_unix_socket_signs_from_the_first_connection_and_systemd_is_told(
    tmp_path: Path,
) -> None:
    """The connection that activates the service gets a token (it waits in the backlog
    while the secret loads), READY=1 comes with a status line, STOPPING=1 at SIGTERM, and
    the socket file stays: it is systemd's."""
    write_secret(tmp_path / "secret.json")
    with open_socket_dir() as sockets:
        path = sockets / "sign.sock"
        ops_port = free_port()
        with activated(tmp_path, [str(path), f"127.0.0.1:{ops_port}"], "signing:ops") as (
            proc,
            lines,
            notify,
        ):
            status, body = sign_on_socket(path)  # starts the sidecar
            assert status == 200, body
            assert signed_with(str(body["token"]), TEST_SECRET)
            (ready,) = notify.until("READY=1")[-1:]
            assert ready.split("\n") == ["READY=1", "STATUS=signing: default v1"]
            wait_http(f"http://127.0.0.1:{ops_port}/readyz", timeout=10, proc=proc)
            started = [json.loads(line) for line in lines if '"reditus-sidecar started"' in line]
            assert "http://127.0.0.1:8787" not in started[0]["address"]  # LISTEN is off
            proc.send_signal(signal.SIGTERM)
            assert notify.until("STOPPING=1")[-1].split("\n") == [
                "STOPPING=1",
                "STATUS=shutting down",
            ]
            assert proc.wait(20) == 0
        assert path.is_socket()


def test_without_a_secret_it_stays_unready_and_says_why(tmp_path: Path) -> None:
    with open_socket_dir() as sockets:
        path = sockets / "sign.sock"
        with (
            activated(tmp_path, [str(path)], "signing") as (proc, _lines, notify),
            socket.socket(socket.AF_UNIX) as first,
        ):
            first.connect(str(path))  # activates; no secret file yet
            first.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            message = notify.next()  # the first word to systemd is not READY=1
            assert message == "STATUS=waiting for a secret: default (no secret)"
            assert proc.poll() is None
            write_secret(tmp_path / "secret.json")
            assert notify.until("READY=1")[-1].startswith("READY=1\n")


def test_a_passed_tcp_socket_signs_on_loopback_with_the_allow_list(tmp_path: Path) -> None:
    write_secret(tmp_path / "secret.json")
    port = free_port()
    with activated(
        tmp_path, [f"127.0.0.1:{port}"], "signing", REDITUS_SIDECAR_ALLOWED_UIDS="4101"
    ) as (proc, _lines, _notify):
        status, body = sign_as(f"tcp:127.0.0.1:{port}", 4101, 4101)
        assert status == 200, body
        status, body = post_token(f"http://127.0.0.1:{port}", {"userId": "u"})  # uid 0
        assert (status, body["error"]["code"]) == (403, "caller_not_allowed")  # type: ignore[index]
        status, body = post_token(
            f"http://127.0.0.1:{port}", {"userId": "u"}, headers={"Host": "evil.example"}
        )
        assert status == 403
        assert proc.poll() is None


def test_a_passed_tcp_socket_off_loopback_is_refused(tmp_path: Path) -> None:
    write_secret(tmp_path / "secret.json")
    port = free_port()
    with activated(tmp_path, [f"0.0.0.0:{port}"], "signing") as (proc, lines, _notify):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            pass
        assert proc.wait(20) == 2
        assert (
            f"reditus-sidecar: configuration error: the TCP socket systemd passed for signing "
            f"is bound to 0.0.0.0:{port}; signing is loopback-only" in "\n".join(lines)
        )


def test_the_watchdog_is_fed_while_the_loop_turns(tmp_path: Path) -> None:
    write_secret(tmp_path / "secret.json")
    with open_socket_dir() as sockets:
        path = sockets / "sign.sock"
        with activated(tmp_path, [str(path)], "signing", WATCHDOG_USEC="200000") as (
            proc,
            _lines,
            notify,
        ):
            assert sign_on_socket(path)[0] == 200
            for _ in range(3):
                notify.until("WATCHDOG=1")
            assert proc.poll() is None


# --- the contract, piece by piece ---------------------------------------------------------


def _passed(count: int, names: str | None) -> dict[str, str]:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count)}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def test_nothing_is_taken_for_another_pid_and_the_variables_go_once_read() -> None:
    env = _passed(1, "signing")
    env["LISTEN_PID"] = str(os.getpid() + 1)
    assert take_passed_sockets(env) is None
    assert "LISTEN_FDS" in env  # not ours: left alone
    env = {"LISTEN_FDS": "1"}
    assert take_passed_sockets(env) is None


def test_names_must_match_the_count() -> None:
    with pytest.raises(ConfigError, match="LISTEN_FDNAMES names 2 sockets but LISTEN_FDS is 1"):
        take_passed_sockets(_passed(1, "signing:ops"))


# In a process of its own: descriptors 3, 4 and 5 of the test process are pytest's.
_TAKE = """
import json, os, socket, sys, tempfile
from sidecar.systemd import take_passed_sockets
names = sys.argv[1] or None
unix = socket.socket(socket.AF_UNIX)
unix.bind(os.path.join(tempfile.mkdtemp(), "s"))
made = [unix, socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))]
def name(sock):
    return None if sock is None else sock.getsockname()
addresses = [name(sock) for sock in made]  # before any is passed (and maybe closed)
count = 3 if names and names.count(":") == 2 else 2
for fd, sock in enumerate(made[:count], start=3):
    if sock.fileno() != fd:
        os.dup2(sock.fileno(), fd)
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count)}
if names:
    env["LISTEN_FDNAMES"] = names
passed = take_passed_sockets(env)
print(json.dumps({
    "left": sorted(env), "made": addresses,
    "unix": name(passed.unix), "tcp": name(passed.tcp), "ops": name(passed.ops),
    "ignored": passed.ignored,
}))
"""


@pytest.mark.parametrize("names", ["", "signing:signing", "signing:ops:other"])
def test_sockets_by_name(names: str) -> None:
    """Unnamed: every socket signs; named: `signing` signs, `ops` serves the ops app, any
    other name is closed."""
    done = subprocess.run(
        [sys.executable, "-c", _TAKE, names],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    got = json.loads(done.stdout)
    unix, tcp, _other = got["made"]
    assert got["left"] == []  # the LISTEN_* variables are gone once read
    assert got["unix"] == unix
    if names == "signing:ops:other":
        assert (got["tcp"], got["ops"], got["ignored"]) == (None, tcp, ["other"])
    else:
        assert (got["tcp"], got["ops"], got["ignored"]) == (tcp, None, [])


def test_the_notifier_speaks_to_abstract_sockets_and_is_silent_without_one() -> None:
    name = f"reditus-sidecar-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + name)
        systemd.settimeout(10)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.send("READY=1", "STATUS=x")
        assert systemd.recv(100) == b"READY=1\nSTATUS=x"
        notifier.close()
    silent = Notifier({})
    assert not silent.enabled
    silent.send("READY=1")  # nothing to send to, nothing raised


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_is_half_of_what_systemd_asks(
    env: dict[str, str], interval: float | None
) -> None:
    assert Notifier(env).watchdog == interval


# --- reditus-sidecar ready -----------------------------------------------------------------


def ready(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "ready", *args],
        env=base_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_ready_follows_readyz(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_SECRET_FILE": str(tmp_path / "s.json"),
        "REDITUS_SIDECAR_METRICS_LISTEN": f"0.0.0.0:{port}",  # a wildcard: asked on loopback
    }
    nothing = ready(env)
    assert nothing.returncode == 1
    assert f"ready: http://127.0.0.1:{port}: " in nothing.stderr
    with run_sidecar(env, wait=False) as sidecar:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=20, proc=sidecar.proc, want=503)
        unready = ready(env)
        assert (unready.returncode, unready.stderr) == (
            1,
            f"ready: http://127.0.0.1:{port}/readyz answered 503\n",
        )
        write_secret(tmp_path / "s.json")
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=20, proc=sidecar.proc)
        assert ready(env).returncode == 0
        assert ready({}, "--url", f"http://127.0.0.1:{port}/").returncode == 0


def test_ready_with_a_bad_address_is_a_configuration_error() -> None:
    done = ready({"REDITUS_SIDECAR_METRICS_LISTEN": "nowhere"})
    assert done.returncode == 2
    assert "REDITUS_SIDECAR_METRICS_LISTEN='nowhere': expected HOST:PORT" in done.stderr
