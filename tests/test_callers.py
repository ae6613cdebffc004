"""The caller allow-list: who may sign is decided by the kernel's credentials of the peer.

Real processes: the sidecar, and clients running as other uids and gids (setpriv).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from sidecar.callers import Caller, CallerPolicy, TcpPeers
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


class _FourTuple:
    """The addresses of a TCP connection whose socket this process has closed already."""

    family = socket.AF_INET

    def __init__(self, conn: socket.socket) -> None:
        self._peer, self._local = conn.getpeername(), conn.getsockname()

    def getpeername(self) -> tuple[str, int]:
        return self._peer  # type: ignore[no-any-return]

    def getsockname(self) -> tuple[str, int]:
        return self._local  # type: ignore[no-any-return]


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
            addresses = _FourTuple(conn)
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


def test_serve_exits_2_on_a_bad_id(file_env: dict[str, str]) -> None:
    proc, lines = spawn(["serve"], base_env(**file_env, REDITUS_SIDECAR_ALLOWED_GIDS="staff"))
    assert proc.wait(30) == 2
    join_output(proc)
    assert lines == [
        "reditus-sidecar: configuration error: REDITUS_SIDECAR_ALLOWED_GIDS='staff': "
        "'staff' is not a numeric id (comma-separated numbers)"
    ]
