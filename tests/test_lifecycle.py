"""The real process at its edges: the unix socket's creation and ownership, a secret path
that is not a file, SIGHUP storms and the shutdown delay."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from sidecar.server import _wait_for_handlers, bind_unix_socket, remove_own_socket

from .support import (
    SidecarProcess,
    eventually,
    post_token,
    scrape,
    scrape_value,
    sign_on_socket,
    start_sidecar,
    wait_http,
    write_secret,
)

pytestmark = pytest.mark.integration

# --- the unix socket ---------------------------------------------------------------------


def test_the_socket_is_0660_from_the_bind_on_whatever_the_umask(tmp_path: Path) -> None:
    """No chmod after the bind: the mode is right from the first moment it exists."""
    previous = os.umask(0)
    try:
        sock, identity = bind_unix_socket(tmp_path / "s.sock")
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o660
        assert os.umask(previous) == previous  # the process umask is restored
    finally:
        sock.close()
        remove_own_socket(tmp_path / "s.sock", identity)
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("offset", [-1, 1])
def test_a_socket_file_that_is_not_ours_any_more_is_left_alone(tmp_path: Path, offset: int) -> None:
    """Only the very file this process bound is removed at exit: another one at the path
    (a new sidecar's socket, whatever its inode number) stays."""
    path = tmp_path / "s.sock"
    path.touch()
    st = os.lstat(path)
    remove_own_socket(path, (st.st_dev, st.st_ino + offset))
    assert path.exists()
    remove_own_socket(path, (st.st_dev, st.st_ino))
    assert not path.exists()


def test_a_second_sidecar_on_a_live_socket_refuses_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.sock"
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    with start_sidecar(first_dir, REDITUS_SIDECAR_UNIX_SOCKET=str(path)) as first:
        with start_sidecar(second_dir, wait=False, REDITUS_SIDECAR_UNIX_SOCKET=str(path)) as second:
            assert second.wait(20) == 1
            assert f"{path}: another process is serving on this socket" in second.output()
        assert path.exists()
        assert sign_on_socket(path)[0] == 200  # the first one still answers on its socket
        assert first.stop() == 0
    assert not path.exists()


def test_a_live_socket_with_a_full_backlog_is_not_taken_over(tmp_path: Path) -> None:
    """A sidecar too busy to accept is still alive: its socket is neither replaced nor
    reported as an unexplained EAGAIN."""
    path = tmp_path / "sidecar.sock"
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(str(path))
    busy.listen(0)
    waiting = [socket.socket(socket.AF_UNIX)]
    waiting[0].connect(str(path))  # the one pending connection a zero backlog holds
    inode = os.lstat(path).st_ino
    try:
        extra = socket.socket(socket.AF_UNIX)
        waiting.append(extra)
        extra.setblocking(False)
        with pytest.raises(BlockingIOError):
            extra.connect(str(path))  # the backlog is full
        with pytest.raises(OSError, match="another process is serving on this socket"):
            bind_unix_socket(path)
        assert os.lstat(path).st_ino == inode
    finally:
        for sock in [*waiting, busy]:
            sock.close()


def test_a_socket_file_replaced_by_someone_else_is_not_deleted_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.sock"
    with start_sidecar(tmp_path, REDITUS_SIDECAR_UNIX_SOCKET=str(path)) as sidecar:
        path.unlink()
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))  # another process's socket now lives at the path
        try:
            assert sidecar.stop() == 0
            assert path.exists()
        finally:
            other.close()


def test_an_unwritable_socket_directory_is_named_in_the_error(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    path = directory / "sidecar.sock"
    # root writes anywhere; without CAP_DAC_OVERRIDE it obeys the directory's mode
    wrapper = ["setpriv", "--bounding-set", "-dac_override", "--"]
    with start_sidecar(
        tmp_path, wait=False, wrapper=wrapper, REDITUS_SIDECAR_UNIX_SOCKET=str(path)
    ) as sidecar:
        assert sidecar.wait(20) == 1, sidecar.output()
        assert f"cannot create the socket {path}: Permission denied" in sidecar.output()


# --- a secret path that is not a file ----------------------------------------------------


def test_a_fifo_at_the_secret_path_freezes_nothing(tmp_path: Path) -> None:
    """open() on a FIFO would block the event loop until a writer came along."""
    fifo = tmp_path / "reditus-secret.json"
    os.mkfifo(fifo)
    with start_sidecar(tmp_path, wait=False, write=False) as sidecar:
        wait_http(sidecar.metrics_url + "/healthz", timeout=20, proc=sidecar.proc)
        wait_http(sidecar.metrics_url + "/readyz", timeout=5, proc=sidecar.proc, want=503)
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert status == 503
        assert body["error"]["code"] == "secret_unavailable"  # type: ignore[index]
        eventually(lambda: "is a FIFO, not a regular file" in sidecar.output(), what="the error")
        # the FIFO is replaced by a real file: picked up on the backoff schedule
        fifo.unlink()
        write_secret(fifo)
        sidecar.wait_ready(timeout=20)


def test_a_directory_at_the_secret_path_is_retried_on_the_backoff(tmp_path: Path) -> None:
    (tmp_path / "reditus-secret.json").mkdir()
    with start_sidecar(
        tmp_path, wait=False, write=False, REDITUS_SIDECAR_BACKOFF_MAX="30"
    ) as sidecar:
        wait_http(sidecar.metrics_url + "/healthz", timeout=20, proc=sidecar.proc)
        time.sleep(4.5)  # what is measured: how many reads 4.5 s hold (not a synchronisation)
        errors = scrape_value(
            sidecar.metrics_url,
            'reditus_sidecar_secret_refresh_total{product="default",result="error"}',
        )
        assert 1 <= errors <= 4, errors  # backoff 1, 2, 4 s; the 1 s file watch would be 5+

        def one_warning_per_error() -> bool:  # each read counts, then logs its warning
            warnings = [line for line in sidecar.lines if "is a directory" in line]
            return len(warnings) == scrape_value(
                sidecar.metrics_url,
                'reditus_sidecar_secret_refresh_total{product="default",result="error"}',
            )

        eventually(one_warning_per_error, what="one warning line per failed read")


# --- signals -----------------------------------------------------------------------------


def reads(sidecar: SidecarProcess) -> float:
    text = scrape(sidecar.metrics_url)
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('reditus_sidecar_secret_refresh_total{product="default"')
    )


def test_a_sighup_storm_coalesces(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, REDITUS_SIDECAR_REFRESH_INTERVAL="3600") as sidecar:
        before = reads(sidecar)
        for _ in range(100):
            sidecar.proc.send_signal(signal.SIGHUP)
        eventually(lambda: reads(sidecar) >= before + 1, what="a read after the SIGHUPs")
        time.sleep(2.5)  # what is measured: the reads 2.5 s hold after the storm
        assert reads(sidecar) - before <= 2


def test_shutdown_delay_keeps_signing_while_unready(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, REDITUS_SIDECAR_SHUTDOWN_DELAY="300") as sidecar:
        sidecar.proc.send_signal(signal.SIGTERM)
        wait_http(sidecar.metrics_url + "/readyz", timeout=10, proc=sidecar.proc, want=503)
        for _ in range(5):
            status, body = post_token(sidecar.api_url, {"userId": "u-late"})
            assert status == 200, body
        assert sidecar.proc.poll() is None
        sidecar.proc.send_signal(signal.SIGTERM)  # a second signal ends the delay
        assert sidecar.wait(15) == 0


def test_shutdown_delay_ends_by_itself(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, REDITUS_SIDECAR_SHUTDOWN_DELAY="1") as sidecar:
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.wait(15) == 0
        assert any("shutdown delay" in line for line in sidecar.lines)


def test_requests_during_the_drain_after_the_delay(tmp_path: Path) -> None:
    """A request in flight when the delay ends still gets its token."""
    with start_sidecar(tmp_path, REDITUS_SIDECAR_SHUTDOWN_DELAY="2") as sidecar:
        host, port = sidecar.api_url.removeprefix("http://").split(":")
        body = b'{"userId": "u-drain"}'
        head = (
            f"POST /v1/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"X-Sidecar-Request: true\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        conn = socket.create_connection((host, int(port)))
        try:
            conn.sendall(head + body[:4])
            sidecar.proc.send_signal(signal.SIGTERM)
            eventually(lambda: any("in-flight" in line for line in sidecar.lines), timeout=20)
            conn.sendall(body[4:])
            answer = conn.recv(4096)
        finally:
            conn.close()
        assert answer.split(b" ", 2)[1] == b"200"
        assert sidecar.wait(15) == 0


def test_a_second_sigterm_during_the_drain_stops_at_once(tmp_path: Path) -> None:
    """The drain waits for a request whose body is still arriving; an operator's second
    SIGTERM does not wait for it (nor for the 5 s body timeout)."""
    with start_sidecar(tmp_path) as sidecar:
        host, port = sidecar.api_url.removeprefix("http://").split(":")
        head = (
            f"POST /v1/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "X-Sidecar-Request: true\r\nContent-Length: 22\r\n\r\n{"
        ).encode()
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(head)
            sidecar.proc.send_signal(signal.SIGTERM)
            eventually(lambda: any("in-flight" in line for line in sidecar.lines), timeout=20)
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.wait(15) == -signal.SIGTERM


class DrainingHandler:
    """Stands in for a TokenHandler: one request in flight until the loop time `until`."""

    def __init__(self, until: float) -> None:
        self.until = until

    @property
    def in_flight(self) -> int:
        return int(asyncio.get_running_loop().time() < self.until)


@pytest.mark.looptime
async def test_the_drain_ends_within_a_hundredth_of_a_second_of_the_last_request() -> None:
    """On a fast-forwarded loop clock: the shutdown waits for requests in a handler, checking
    every 10 ms, and gives up at the grace period."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    await _wait_for_handlers([DrainingHandler(began + 0.5)], grace=5.0)  # type: ignore[list-item]
    assert 0.5 <= loop.time() - began <= 0.52
    began = loop.time()
    await _wait_for_handlers([DrainingHandler(began + 60)], grace=5.0)  # type: ignore[list-item]
    assert loop.time() - began == pytest.approx(5.0)  # the check at the grace itself ends it
    began = loop.time()  # a grace between two checks: the first check past it ends the wait
    await _wait_for_handlers([DrainingHandler(began + 60)], grace=5.005)  # type: ignore[list-item]
    assert 5.005 <= loop.time() - began <= 5.02
