"""The issuance audit, against the real process: what a record holds, what it never holds,
and what happens when it cannot be written (open: counted, signing goes on; closed: 503)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.audit import AuditLog
from sidecar.config import AuditSettings, load_settings
from sidecar.errors import ConfigError
from sidecar.metrics import Metrics
from tests.support import (
    ROOT,
    TEST_PRODUCT_ID,
    TEST_SECRET,
    SidecarProcess,
    base_env,
    eventually,
    free_port,
    open_socket_dir,
    open_to_all,
    post_token,
    request_token,
    scrape_value,
    sign_as,
    start_sidecar,
    wait_http,
    write_secret,
)

pytestmark = pytest.mark.integration

AUDIT_KEY = b"audit-key-for-tests-0123456789abcdef-0123456789"
WRITTEN = "reditus_sidecar_audit_records_total"
WRITE_ERRORS = 'reditus_sidecar_audit_errors_total{reason="write"}'
ISSUED = 'reditus_sidecar_tokens_issued_total{product="default"}'


def records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def audit_lines(sidecar: SidecarProcess) -> list[dict[str, object]]:
    return [r for r in sidecar.log_records() if r.get("audit") is True]


def test_records_name_caller_product_and_version_and_never_the_token(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    audit_file = audit_dir / "issued.log"
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(AUDIT_KEY + b"\n")
    socket_user, tcp_user = "socket-user-8c1e5a", "tcp-user-4f2b77"
    with open_socket_dir() as sockets:
        socket_path = sockets / "sidecar.sock"
        with start_sidecar(
            tmp_path,
            REDITUS_SIDECAR_UNIX_SOCKET=str(socket_path),
            REDITUS_SIDECAR_AUDIT=str(audit_file),
            REDITUS_SIDECAR_AUDIT_KEY_FILE=str(key_file),
            REDITUS_SIDECAR_LOG_LEVEL="debug",
        ) as sidecar:
            open_to_all(socket_path)
            status, socket_answer = sign_as(socket_path, 4101, 4202, {"userId": socket_user})
            assert status == 200
            status, headers, tcp_answer = request_token(
                sidecar.api_url, {"userId": tcp_user}, headers={"X-Request-Id": "req-audit-1"}
            )
            assert status == 200
            eventually(lambda: len(records(audit_file)) == 2, what="two audit records")
            # counted once the write returned, a moment after the lines are in the file
            eventually(lambda: scrape_value(sidecar.metrics_url, WRITTEN) == 2, what="counted")
            # A rotated secret shows as a new version in the records that follow.
            write_secret(sidecar.secret_file, secret=TEST_SECRET + "-rotated")  # type: ignore[arg-type]

            def rotated() -> bool:
                post_token(sidecar.api_url, {"userId": tcp_user})
                return records(audit_file)[-1]["version"] == 2

            eventually(rotated, what="a record with secret version 2")
        output = sidecar.output()

    on_socket, on_tcp = records(audit_file)[:2]
    expected_key_id = hmac.new(AUDIT_KEY, b"key-id", hashlib.sha256).hexdigest()[:16]
    assert on_socket["caller"] == {"uid": 4101, "gid": 4202, "pid": on_socket["caller"]["pid"]}  # type: ignore[index]
    assert isinstance(on_socket["caller"]["pid"], int)  # type: ignore[index]
    assert on_socket["caller"]["pid"] > 1  # type: ignore[index]
    assert on_tcp == {
        "audit": True,
        "time": on_tcp["time"],
        "request_id": "req-audit-1",
        "product": "default",
        "product_id": TEST_PRODUCT_ID,
        "version": 1,
        "issued_at": tcp_answer["issuedAt"],
        "caller": {"uid": 0, "via": "tcp"},  # this test's uid, from inet_diag
        "user_hmac": hmac.new(AUDIT_KEY, tcp_user.encode(), hashlib.sha256).hexdigest(),
        "user_key_id": expected_key_id,
    }
    assert str(on_tcp["time"]).endswith("Z")
    assert (
        on_socket["user_hmac"]
        == hmac.new(AUDIT_KEY, socket_user.encode(), hashlib.sha256).hexdigest()
    )
    assert headers["X-Request-Id"] == "req-audit-1"
    # Never the token, the secret, the raw user id or the key: not in the file, not in the log.
    text = audit_file.read_text()
    for value in (
        socket_answer["token"], tcp_answer["token"], TEST_SECRET, socket_user, tcp_user,
        AUDIT_KEY.decode(),
    ):  # fmt: skip
        assert value not in text
        assert value not in output
    assert oct(audit_file.stat().st_mode & 0o777) == "0o600"


def test_stdout_records_are_marked_among_the_log_lines(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, REDITUS_SIDECAR_AUDIT="stdout") as sidecar:
        status, answer = post_token(sidecar.api_url, {"userId": "stdout-user-91d0"})
        assert status == 200
        eventually(lambda: len(audit_lines(sidecar)) == 1, what="an audit line on stdout")
        (record,) = audit_lines(sidecar)
        assert record["caller"] == {"uid": 0, "via": "tcp"}
        assert record["product_id"] == TEST_PRODUCT_ID
        assert "user_hmac" not in record  # no key configured: no user field at all
        assert sum("audit" in r for r in sidecar.log_records()) == 1  # log records lack it
        assert "stdout-user-91d0" not in sidecar.output()
        assert str(answer["token"]) not in sidecar.output()


# The disk is full for this process: writes past N bytes fail with EFBIG ("File too large"),
# and the one that crosses N is cut short, as on a full disk. Only the soft limit: the test
# may lift it again.
def full_disk_at(size: int) -> tuple[str, ...]:
    return ("prlimit", f"--fsize={size}:unlimited", "--")


def test_unwritable_target_is_counted_and_signing_goes_on_when_open(tmp_path: Path) -> None:
    audit_file = tmp_path / "issued.log"
    with start_sidecar(
        tmp_path, REDITUS_SIDECAR_AUDIT=str(audit_file), wrapper=full_disk_at(0)
    ) as sidecar:
        for _ in range(3):
            assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        eventually(lambda: scrape_value(sidecar.metrics_url, WRITE_ERRORS) == 3, what="3 lost")
        assert scrape_value(sidecar.metrics_url, WRITTEN) == 0
        assert scrape_value(sidecar.metrics_url, ISSUED) == 3
        errors = [
            r for r in sidecar.log_records() if r["msg"] == "audit records could not be written"
        ]
        assert errors
        assert errors[0]["error"] == "File too large"
        assert len(errors) == 1  # reported at a bounded rate, not once per record


def test_a_write_cut_short_keeps_only_whole_records(tmp_path: Path) -> None:
    """A record the full disk cut in half is truncated away and not counted as written: the
    file holds whole JSON lines only, and once there is room again the next record starts
    on its own line."""
    audit_file = tmp_path / "issued.log"
    with start_sidecar(
        tmp_path, REDITUS_SIDECAR_AUDIT=str(audit_file), wrapper=full_disk_at(500)
    ) as sidecar:
        for sent in range(1, 5):  # one record a batch: about 230 bytes each
            assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200

            def handled(sent: int = sent) -> bool:
                return (
                    scrape_value(sidecar.metrics_url, WRITTEN)
                    + scrape_value(sidecar.metrics_url, WRITE_ERRORS)
                    == sent
                )

            eventually(handled, what=f"record {sent} written or lost")
        kept = records(audit_file)  # each line parses
        assert len(kept) == scrape_value(sidecar.metrics_url, WRITTEN) == 2
        assert scrape_value(sidecar.metrics_url, WRITE_ERRORS) == 2
        assert audit_file.read_bytes().endswith(b"\n")
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(sidecar.proc.pid, resource.RLIMIT_FSIZE, unlimited)  # room again
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        eventually(lambda: scrape_value(sidecar.metrics_url, WRITTEN) == 3, what="written again")
        assert len(records(audit_file)) == 3


def test_closed_mode_refuses_while_the_audit_cannot_be_written(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    audit_file = audit_dir / "issued.log"
    with start_sidecar(
        tmp_path, REDITUS_SIDECAR_AUDIT=str(audit_file), REDITUS_SIDECAR_AUDIT_FAIL="closed"
    ) as sidecar:
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        assert len(records(audit_file)) == 1  # closed: written before the token is released
        shutil.rmtree(audit_dir)  # the directory is removed under the sidecar
        status, headers, body = request_token(sidecar.api_url, {"userId": "u"})
        assert (status, body["error"]["code"]) == (503, "audit_unavailable")  # type: ignore[index]
        assert headers["Retry-After"] == "1"
        assert "token" not in body
        assert scrape_value(sidecar.metrics_url, ISSUED) == 1
        assert scrape_value(sidecar.metrics_url, WRITE_ERRORS) == 1
        audit_dir.mkdir()  # back: the next request writes a new file and signs
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        assert len(records(audit_file)) == 1


def test_closed_mode_on_a_full_disk_refuses(tmp_path: Path) -> None:
    audit_file = tmp_path / "issued.log"
    with start_sidecar(
        tmp_path,
        REDITUS_SIDECAR_AUDIT=str(audit_file),
        REDITUS_SIDECAR_AUDIT_FAIL="closed",
        wrapper=full_disk_at(0),
    ) as sidecar:
        started = [r for r in sidecar.log_records() if r["msg"] == "issuance audit on"]
        assert [r["detail"] for r in started] == [f"{audit_file}, failing closed"]
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert (status, body["error"]["code"]) == (503, "audit_unavailable")  # type: ignore[index]
        assert (
            scrape_value(
                sidecar.metrics_url,
                'reditus_sidecar_token_errors_total{reason="audit_unavailable"}',
            )
            == 1
        )


def test_a_fifo_or_symlink_put_at_the_path_is_never_written(tmp_path: Path) -> None:
    """Whoever can write to the audit directory may swap the file for a FIFO (whose open
    would block the writer for good) or a symlink (to /dev/null, or to a file it cannot
    write itself). Neither is opened: failing closed, the request is refused at once."""
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    audit_file = audit_dir / "issued.log"
    victim = tmp_path / "victim"
    victim.write_bytes(b"kept\n")
    with start_sidecar(
        tmp_path, REDITUS_SIDECAR_AUDIT=str(audit_file), REDITUS_SIDECAR_AUDIT_FAIL="closed"
    ) as sidecar:
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        audit_file.unlink()
        os.mkfifo(audit_file)  # nobody reads it
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert (status, body["error"]["code"]) == (503, "audit_unavailable")  # type: ignore[index]
        audit_file.unlink()
        audit_file.symlink_to(victim)
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert (status, body["error"]["code"]) == (503, "audit_unavailable")  # type: ignore[index]
        assert victim.read_bytes() == b"kept\n"
        assert scrape_value(sidecar.metrics_url, WRITE_ERRORS) == 2
        assert scrape_value(sidecar.metrics_url, ISSUED) == 1
        audit_file.unlink()  # a regular file again: signing resumes
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        assert len(records(audit_file)) == 1


def test_a_rotated_away_file_is_reopened(tmp_path: Path) -> None:
    audit_file = tmp_path / "issued.log"
    with start_sidecar(tmp_path, REDITUS_SIDECAR_AUDIT=str(audit_file)) as sidecar:
        started = [r for r in sidecar.log_records() if r["msg"] == "issuance audit on"]
        assert [r["detail"] for r in started] == [f"{audit_file}, failing open"]
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        eventually(lambda: len(records(audit_file)) == 1, what="the first record")
        os.rename(audit_file, tmp_path / "issued.log.1")  # logrotate's default (create) mode
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        eventually(lambda: len(records(audit_file)) == 1, what="a record in the new file")
        assert len(records(tmp_path / "issued.log.1")) == 1


def test_a_new_key_shows_as_a_new_key_id(tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(AUDIT_KEY)
    audit_file = tmp_path / "issued.log"
    with start_sidecar(
        tmp_path,
        REDITUS_SIDECAR_AUDIT=str(audit_file),
        REDITUS_SIDECAR_AUDIT_KEY_FILE=str(key_file),
    ) as sidecar:
        assert post_token(sidecar.api_url, {"userId": "u-rotate"})[0] == 200
        eventually(lambda: len(records(audit_file)) == 1, what="a record under the first key")
        new_key = AUDIT_KEY[::-1]
        tmp = tmp_path / "audit.key.new"
        tmp.write_bytes(new_key)
        tmp.replace(key_file)

        def rehashed() -> bool:
            post_token(sidecar.api_url, {"userId": "u-rotate"})
            last = records(audit_file)[-1]
            return last["user_hmac"] == hmac.new(new_key, b"u-rotate", hashlib.sha256).hexdigest()

        eventually(rehashed, what="records hashed with the new key")
        assert (
            records(audit_file)[-1]["user_key_id"]
            == (hmac.new(new_key, b"key-id", hashlib.sha256).hexdigest()[:16])
        )
        assert records(audit_file)[0]["user_key_id"] != records(audit_file)[-1]["user_key_id"]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDITUS_SIDECAR_AUDIT": "audit.log"}, "REDITUS_SIDECAR_AUDIT='audit.log': expected off, stdout or an absolute file path"),
        ({"REDITUS_SIDECAR_AUDIT": "/no/such/dir/audit.log"}, "directory /no/such/dir does not exist"),
        ({"REDITUS_SIDECAR_AUDIT": "/tmp"}, "REDITUS_SIDECAR_AUDIT='/tmp': is a directory"),
        ({"REDITUS_SIDECAR_AUDIT": "/dev/full"}, "REDITUS_SIDECAR_AUDIT='/dev/full': is not a regular file (a FIFO, socket or device)"),
        ({"REDITUS_SIDECAR_AUDIT": "/dev/stdout"}, "REDITUS_SIDECAR_AUDIT='/dev/stdout': is a symbolic link; name the file itself"),
        ({"REDITUS_SIDECAR_AUDIT": "stdout", "REDITUS_SIDECAR_AUDIT_FAIL": "maybe"}, "REDITUS_SIDECAR_AUDIT_FAIL='maybe': expected one of open, closed"),
        ({"REDITUS_SIDECAR_AUDIT": "stdout", "REDITUS_SIDECAR_AUDIT_KEY_FILE": "/no/key"}, "REDITUS_SIDECAR_AUDIT_KEY_FILE='/no/key': no such file"),
    ],
)  # fmt: skip
def test_bad_audit_settings_are_refused(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    base = {
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_SECRET_FILE": str(tmp_path / "s"),
    }
    with pytest.raises(ConfigError) as info:
        load_settings({**base, **env})
    assert needle in str(info.value)


def test_a_short_audit_key_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_bytes(b"short\n")
    env = {
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_SECRET_FILE": str(tmp_path / "s"),
        "REDITUS_SIDECAR_AUDIT": "stdout",
        "REDITUS_SIDECAR_AUDIT_KEY_FILE": str(key_file),
    }
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert "is 5 bytes; at least 32 are needed" in str(info.value)


async def test_a_formatting_bug_fails_the_record_instead_of_hanging_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing closed, a request waits for its record: an unexpected error in the writer
    thread must answer it (not written) and leave the thread alive for the next one."""
    metrics = Metrics(CollectorRegistry(), ["default"], "test")
    audit = AuditLog(AuditSettings(str(tmp_path / "a.log"), True, None), metrics)
    audit.start()
    record = {
        "request_id": "r", "product": "default", "product_id": "p", "version": 1,
        "issued_at": 1, "caller": "tcp", "user_id": "u",
    }  # fmt: skip
    broken = audit._line
    monkeypatch.setattr(audit, "_line", lambda entry: 1 / 0)
    pending = audit.submit(**record)  # type: ignore[arg-type]
    assert pending is not None
    assert await asyncio.wait_for(pending, 10) is False
    monkeypatch.setattr(audit, "_line", broken)
    pending = audit.submit(**record)  # type: ignore[arg-type]
    assert pending is not None
    assert await asyncio.wait_for(pending, 10) is True
    await audit.close()
    assert len(records(tmp_path / "a.log")) == 1


F_SETPIPE_SZ = 1031  # fcntl.h
PIPE_SIZE = 4096


@contextlib.contextmanager
def stdout_nobody_drains(tmp_path: Path, **env: str) -> Iterator[SidecarProcess]:
    """The sidecar writing its stdout into a pipe of 4 KiB this test does not read, as a
    container runtime whose log collector stalled."""
    write_secret(tmp_path / "s.json")
    api, ops = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve"],
        env=base_env(
            REDITUS_SIDECAR_LISTEN=f"127.0.0.1:{api}",
            REDITUS_SIDECAR_METRICS_LISTEN=f"127.0.0.1:{ops}",
            REDITUS_SIDECAR_SECRET_SOURCE="file",
            REDITUS_SIDECAR_SECRET_FILE=str(tmp_path / "s.json"),
            REDITUS_SIDECAR_AUDIT="stdout",
            **env,
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
    sidecar = SidecarProcess(proc, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{ops}", None)  # type: ignore[arg-type]
    try:
        sidecar.wait_ready()
        yield sidecar
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.read()
        proc.wait(10)
        proc.stdout.close()


def blocked_on_the_pipe(proc: subprocess.Popen[bytes]) -> bool:
    """A thread of the process sleeps in the kernel's pipe write: the pipe is full."""
    tasks = Path(f"/proc/{proc.pid}/task")
    return any("pipe_write" in (task / "wchan").read_text() for task in tasks.iterdir())


def test_a_stdout_that_stops_draining_costs_lines_never_the_process(tmp_path: Path) -> None:
    """The audit writer blocks on the full pipe. The event loop never writes stdout itself,
    so a log line (SIGHUP logs one) cannot freeze it: probes answer, signing goes on, and
    SIGTERM ends the process with 0."""
    with stdout_nobody_drains(tmp_path) as sidecar:
        sent = 0
        while not blocked_on_the_pipe(sidecar.proc):  # type: ignore[arg-type]
            assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
            sent += 1
            assert sent < 1000, "4 KiB of records never filled the pipe"
        sidecar.proc.send_signal(signal.SIGHUP)  # a log line from the event loop
        for _ in range(20):
            assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200
        wait_http(sidecar.metrics_url + "/healthz", timeout=5, proc=sidecar.proc)
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(20) == 0


def test_failing_closed_a_stuck_writer_refuses_in_bounded_time_and_is_not_ready(
    tmp_path: Path,
) -> None:
    with stdout_nobody_drains(tmp_path, REDITUS_SIDECAR_AUDIT_FAIL="closed") as sidecar:
        sent = 0
        while True:  # each token waits for its record: until the pipe is full
            status, body = post_token(sidecar.api_url, {"userId": "u"})
            if status != 200:
                break
            sent += 1
            assert sent < 1000, "4 KiB of records never filled the pipe"
        assert (status, body["error"]["code"]) == (503, "audit_unavailable")  # type: ignore[index]
        assert blocked_on_the_pipe(sidecar.proc)  # type: ignore[arg-type]
        wait_http(sidecar.metrics_url + "/readyz", timeout=20, proc=sidecar.proc, want=503)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(sidecar.metrics_url + "/readyz", timeout=5)  # noqa: S310
        assert json.loads(refused.value.read())["audit"] == "stuck"
        assert scrape_value(sidecar.metrics_url, "reditus_sidecar_ready") == 0  # says the same
        wait_http(sidecar.metrics_url + "/healthz", timeout=5, proc=sidecar.proc)
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(20) == 0
