"""The caller allow-list: who may sign is decided by the kernel's credentials of the peer.

Real processes: the sidecar, and clients running as other uids and gids (setpriv).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.callers import Caller, CallerPolicy, TcpPeers, identify, peer_credentials
from sidecar.config import load_settings
from sidecar.errors import ConfigError
from tests.support import (
    SIGNING_HEADERS,
    TEST_SECRET,
    base_env,
    join_output,
    open_socket_dir,
    open_to_all,
    post_token,
    scrape_value,
    sign_as,
    signed_with,
    spawn,
    start_sidecar,
)

REFUSED = 'reditus_sidecar_token_errors_total{reason="caller_not_allowed"}'


@pytest.mark.integration
def test_listed_uid_or_gid_signs_others_are_refused_and_tcp_too(tmp_path: Path) -> None:
    with open_socket_dir() as sockets:
        socket_path = sockets / "sidecar.sock"
        with start_sidecar(
            tmp_path,
            REDITUS_SIDECAR_UNIX_SOCKET=str(socket_path),
            REDITUS_SIDECAR_ALLOWED_UIDS="4101, 4102",
            REDITUS_SIDECAR_ALLOWED_GIDS="4202",
        ) as sidecar:
            open_to_all(socket_path)
            allowed = [r for r in sidecar.log_records() if r["msg"] == "signing allowed to"]
            assert [r["detail"] for r in allowed] == ["uids 4101,4102; gids 4202"]
            status, body = sign_as(socket_path, 4101, 4999)  # uid listed
            assert status == 200, body
            assert signed_with(str(body["token"]), TEST_SECRET)
            status, body = sign_as(socket_path, 4998, 4202)  # gid listed
            assert status == 200, body
            assert scrape_value(sidecar.metrics_url, REFUSED) == 0

            for uid, gid in [(4997, 4996), (0, 0), (4202, 4101)]:  # ids listed in the other list
                status, body = sign_as(socket_path, uid, gid)
                assert (status, body["error"]["code"]) == (403, "caller_not_allowed"), (uid, body)  # type: ignore[index]
                assert f"uid {uid} and gid {gid}" in body["error"]["message"]  # type: ignore[index]
            # TCP: the kernel's socket table names the peer's uid (inet_diag), not its gid.
            tcp = "tcp:" + sidecar.api_url.removeprefix("http://")
            status, body = sign_as(tcp, 4101, 4999)
            assert status == 200, body
            status, body = sign_as(tcp, 4998, 4202)  # a listed gid does not count on TCP
            assert (status, body["error"]["code"]) == (403, "caller_not_allowed")  # type: ignore[index]
            status, body = post_token(sidecar.api_url, {"userId": "u"})  # this test: uid 0
            assert (status, body["error"]["code"]) == (403, "caller_not_allowed")  # type: ignore[index]
            assert body["error"]["message"] == "uid 0 is not allowed to sign"  # type: ignore[index]
            assert scrape_value(sidecar.metrics_url, REFUSED) == 5

            # Order 2a: after method_not_allowed, before missing_request_header.
            status, body = sign_as(socket_path, 4997, 4996, method="GET")
            assert (status, body["error"]["code"]) == (405, "method_not_allowed")  # type: ignore[index]
            headers = {"Content-Type": "application/json"}
            status, body = sign_as(socket_path, 4997, 4996, headers=headers)
            assert (status, body["error"]["code"]) == (403, "caller_not_allowed")  # type: ignore[index]
            status, body = sign_as(socket_path, 4101, 4999, headers=headers)
            assert (status, body["error"]["code"]) == (403, "missing_request_header")  # type: ignore[index]
            assert scrape_value(sidecar.metrics_url, REFUSED) == 6


@pytest.mark.integration
def test_without_a_list_any_local_caller_signs(tmp_path: Path) -> None:
    with open_socket_dir() as sockets:
        socket_path = sockets / "sidecar.sock"
        with start_sidecar(tmp_path, REDITUS_SIDECAR_UNIX_SOCKET=str(socket_path)) as sidecar:
            open_to_all(socket_path)
            assert sign_as(socket_path, 4997, 4996, headers=SIGNING_HEADERS)[0] == 200
            assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
            assert scrape_value(sidecar.metrics_url, REFUSED) == 0


def test_policy_is_uid_or_gid_and_unidentified_is_refused() -> None:
    policy = CallerPolicy(frozenset({10}), frozenset({20}))
    assert policy.allows(Caller(uid=10, gid=1, pid=5))
    assert policy.allows(Caller(uid=1, gid=20, pid=5))
    assert not policy.allows(Caller(uid=20, gid=10, pid=5))
    assert policy.allows(Caller(uid=10, gid=None, pid=None))  # TCP: the uid only
    assert not policy.allows(Caller(uid=20, gid=None, pid=None))
    assert not policy.allows(None)
    assert CallerPolicy(frozenset(), frozenset({20, 3})).describe() == "uids -; gids 3,20"


def test_identity_and_allow_list_stay_as_made() -> None:
    """The caller checked is the caller audited, and nothing widens the list at run time."""
    caller = Caller(uid=10, gid=20, pid=30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        caller.uid = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CallerPolicy(frozenset({10}), frozenset()).uids = frozenset({0})  # type: ignore[misc]


def test_caller_json_says_what_the_kernel_told() -> None:
    """The audit's caller: uid, gid and pid from SO_PEERCRED, the uid alone on TCP."""
    assert Caller(uid=10, gid=20, pid=30).as_json() == {"uid": 10, "gid": 20, "pid": 30}
    assert Caller(uid=10, gid=None, pid=None).as_json() == {"uid": 10, "via": "tcp"}


def test_peer_credentials_of_a_connected_unix_socket_only() -> None:
    me = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    left, right = socket.socketpair()
    with left, right:
        assert peer_credentials(left) == me
        assert identify(left, TcpPeers()) == me
    assert peer_credentials(left) is None  # closed: the kernel cannot be asked (EBADF)
    assert peer_credentials(None) is None
    # SO_PEERCRED on a TCP socket does not fail: it reads uid and gid 65534 (nobody).
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as tcp,
    ):
        assert peer_credentials(tcp) is None
    with socket.socket() as unconnected:
        assert TcpPeers().uid(unconnected) is None  # no peer to look up (ENOTCONN)


class _FourTuple:
    """The addresses of a TCP connection whose socket this process has closed already."""

    family = socket.AF_INET

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self._peer, self._local = peer, local

    def getpeername(self) -> tuple[str, int]:
        return self._peer

    def getsockname(self) -> tuple[str, int]:
        return self._local


@pytest.mark.integration
def test_tcp_peer_uid_while_it_owns_its_socket_and_not_in_time_wait() -> None:
    """inet_diag names the uid owning the peer's socket; once the peer has closed first and
    sits in TIME_WAIT nobody owns it (the kernel reports uid 0), so it is unidentified."""
    peers = TcpPeers()
    script = (
        "import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
        " s.recv(1); s.close()"
    )
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = subprocess.Popen(
            ["setpriv", "--reuid=4101", "--regid=4101", "--clear-groups", "/usr/bin/python3",
             "-c", script, str(server.getsockname()[1])]
        )  # fmt: skip
        conn, _ = server.accept()
        with conn:
            assert peers.uid(conn) == 4101
            addresses = _FourTuple(conn.getpeername(), conn.getsockname())
            conn.sendall(b"x")  # the client reads it and closes first
            assert client.wait(10) == 0
            assert conn.recv(1) == b""
        # The client's socket is now in TIME_WAIT (the process has exited).
        assert peers.uid(addresses) is None
    peers.close()


@pytest.fixture
def file_env(tmp_path: Path) -> dict[str, str]:
    return {
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_SECRET_FILE": str(tmp_path / "s.json"),
    }


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("1000,abc", "REDITUS_SIDECAR_ALLOWED_UIDS='1000,abc': 'abc' is not a numeric id"),
        ("1000,", "REDITUS_SIDECAR_ALLOWED_UIDS='1000,': an empty item is not a numeric id"),
        ("-1", "'-1' is not a numeric id"),
        ("4294967295", "4294967295 is larger than the largest id 4294967294"),
        (
            "\uff11\uff12",
            "'\uff11\uff12' is not a numeric id",
        ),  # full-width digits: isdigit() alone would pass
    ],
)
def test_bad_ids_are_refused_precisely(file_env: dict[str, str], value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**file_env, "REDITUS_SIDECAR_ALLOWED_UIDS": value})
    assert needle in str(info.value)


def test_ids_parse_with_spaces_and_either_list_alone(file_env: dict[str, str]) -> None:
    settings = load_settings({**file_env, "REDITUS_SIDECAR_ALLOWED_GIDS": " 5, 6 ,5"})
    assert settings.callers == CallerPolicy(frozenset(), frozenset({5, 6}))
    assert load_settings({**file_env, "REDITUS_SIDECAR_ALLOWED_UIDS": ""}).callers is None


@pytest.mark.integration
def test_serve_exits_2_on_a_bad_id(file_env: dict[str, str]) -> None:
    proc, lines = spawn(["serve"], base_env(**file_env, REDITUS_SIDECAR_ALLOWED_GIDS="staff"))
    assert proc.wait(30) == 2
    join_output(proc)
    assert lines == [
        "reditus-sidecar: configuration error: REDITUS_SIDECAR_ALLOWED_GIDS='staff': "
        "'staff' is not a numeric id (comma-separated numbers)"
    ]


# A peer as another uid, driven line by line: "shut" (shutdown its sending side), "close"
# (close its socket: the kernel keeps an orphan nobody owns), "fill" (send until its buffer
# is full: this test never reads, so its FIN then waits behind the data).
_PEER = """
import socket, sys
s = socket.socket()
if sys.argv[2] == "lo":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")  # as `curl --interface lo`
s.connect(("127.0.0.1", int(sys.argv[1])))
for line in sys.stdin:
    if line == "shut\\n":
        s.shutdown(socket.SHUT_WR)
    elif line == "close\\n":
        s.close()
    else:
        s.setblocking(False)
        try:
            while True:
                s.send(bytes(65536))
        except BlockingIOError:
            pass
    print("done", flush=True)
"""


@contextlib.contextmanager
def _peer_as_4101(device: str = "-") -> Iterator[tuple[socket.socket, Callable[[str], None]]]:
    """This test's end of a connection from uid 4101, and a function to make that peer act."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window to fill
        client = subprocess.Popen(
            ["setpriv", "--reuid=4101", "--regid=4101", "--clear-groups", "/usr/bin/python3",
             "-c", _PEER, str(server.getsockname()[1]), device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdin is not None
        assert client.stdout is not None
        commands, answers = client.stdin, client.stdout

        def act(command: str) -> None:
            commands.write(command + "\n")
            commands.flush()
            assert answers.readline() == "done\n"

        try:
            conn, _ = server.accept()
            with conn:
                yield conn, act
        finally:
            commands.close()
            assert client.wait(10) == 0
            answers.close()


def _wait_for_peer_state(conn: socket.socket, state: int) -> None:
    """Poll the kernel's TCP table until the peer's socket is in `state` (linux/tcp_states.h)."""

    def hex_address(host: str, port: int) -> str:
        return f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"

    pair = [hex_address(*conn.getpeername()), hex_address(*conn.getsockname())]
    deadline = time.monotonic() + 10
    while True:
        rows = [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        states = [int(row[3], 16) for row in rows if row[1:3] == pair]
        if states == [state]:
            return
        assert time.monotonic() < deadline, f"the peer's socket is in {states}, not {state}"
        time.sleep(0.01)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("steps", "state"),
    [
        (["shut"], 5),  # FIN_WAIT2: the peer shut its side, ours is still open
        (["us"], 8),  # CLOSE_WAIT: we shut ours
        (["us", "fill", "shut"], 9),  # LAST_ACK: its FIN waits behind data we do not read
        (["fill", "shut"], 4),  # FIN_WAIT1: the same, with our side still open
        (["fill", "shut", "us"], 11),  # CLOSING: both FINs crossed
    ],
)
def test_tcp_peer_shutting_down_still_owns_its_socket(steps: list[str], state: int) -> None:
    """A peer half-way through closing still holds its socket: it is still its uid's."""
    peers = TcpPeers()
    with _peer_as_4101() as (conn, act):
        for step in steps:
            if step == "us":
                conn.shutdown(socket.SHUT_WR)
            else:
                act(step)
        _wait_for_peer_state(conn, state)
        assert peers.uid(conn) == 4101
    peers.close()


@pytest.mark.integration
@pytest.mark.parametrize("steps", [["close"], ["fill", "close"]])
def test_tcp_peer_that_closed_its_socket_is_unidentified(steps: list[str]) -> None:
    """A peer that sent its request and closed at once leaves an orphan in FIN_WAIT (the
    process still runs, the socket is nobody's): the kernel reports uid 0 with inode 0 for it,
    which must not pass for root."""
    peers = TcpPeers()
    with _peer_as_4101() as (conn, act):
        for step in steps:
            act(step)
        _wait_for_peer_state(conn, 5 if steps == ["close"] else 4)
        assert peers.uid(conn) is None
        assert peers.uid(conn) is None  # and the lookup after it too
    peers.close()


@pytest.mark.integration
def test_tcp_peer_bound_to_loopback_is_identified() -> None:
    """A socket bound to `lo` (SO_BINDTODEVICE, no privilege needed) is found only by a lookup
    on that interface; the listener is loopback-only, so every peer is on `lo`."""
    peers = TcpPeers()
    with _peer_as_4101("lo") as (conn, _):
        assert peers.uid(conn) == 4101
    peers.close()


@pytest.mark.integration
def test_tcp_lookups_go_on_after_many_a_miss_and_a_close() -> None:
    """One netlink socket answers lookup after lookup (sequence numbers well past 256), a
    socket that does not exist is unidentified without upsetting the next lookup, and after
    close() the next lookup opens a fresh netlink socket."""
    peers = TcpPeers()
    peers.close()  # never opened: the listener closes it also when TCP lookups are off
    with _peer_as_4101() as (conn, _), socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = _FourTuple(unused.getsockname(), conn.getsockname())
        for _ in range(300):
            assert peers.uid(conn) == 4101
        assert peers.uid(nobody) is None
        assert peers.uid(conn) == 4101
        peers.close()
        assert peers.uid(conn) == 4101
    peers.close()
