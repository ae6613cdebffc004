"""The issuance audit in process: the record's exact shape, the queue and batch bounds, the
writer thread's failure handling and its rate-limited report, the key's re-read, and the
file target's reopening. Clocks are injected by patching time.monotonic in sync tests."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar import audit as audit_module
from sidecar.audit import (
    BATCH,
    QUEUE_LIMIT,
    AuditLog,
    Entry,
    _FileTarget,
    _UserHasher,
)
from sidecar.audit_key import key_id, read_key
from sidecar.callers import Caller
from sidecar.config import AuditSettings
from sidecar.errors import ConfigError
from sidecar.metrics import Metrics
from tests.support import FakeClock

KEY = b"k" * 32
RECORD: dict[str, Any] = {
    "request_id": "r-1",
    "product": "default",
    "product_id": "p-1",
    "version": 3,
    "issued_at": 1700000000,
    "caller": "tcp",
    "user_id": "u-1",
}


class FakeTarget:
    """Records each write; can hold the writer thread inside write() or fail it."""

    def __init__(self, *, hold: bool = False, error: OSError | None = None) -> None:
        self.writes: list[bytes] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.error = error
        self.closed = False

    def write(self, lines: list[bytes]) -> None:
        self.entered.set()
        assert self.release.wait(30)
        if self.error is not None:
            raise self.error
        self.writes.append(b"".join(lines))

    def close(self) -> None:
        self.closed = True

    def batch_sizes(self) -> list[int]:
        return [data.count(b"\n") for data in self.writes]


def make_audit(
    tmp_path: Path,
    *,
    closed: bool = False,
    key_file: Path | None = None,
    target: FakeTarget | None = None,
) -> tuple[AuditLog, CollectorRegistry]:
    registry = CollectorRegistry()
    audit = AuditLog(
        AuditSettings(str(tmp_path / "audit.log"), closed, key_file),
        Metrics(registry, ["default"], "test"),
    )
    if target is not None:
        audit._target = target  # type: ignore[assignment]
    return audit, registry


def errors(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("reditus_sidecar_audit_errors_total", {"reason": reason})


def written(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("reditus_sidecar_audit_records_total")


def entry(user_id: str = "u-1") -> Entry:
    return Entry(0.0, "r", "default", "p", 1, 1, "tcp", user_id, None)


# --- the key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "key"),
    [(b"k" * 32, b"k" * 32), (b"k" * 32 + b"\r\n", b"k" * 32), (b"k" * 33 + b"\n", b"k" * 33)],
)
def test_keys_of_32_bytes_or_more_are_read_without_the_newline(
    tmp_path: Path, content: bytes, key: bytes
) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    assert read_key(path) == key


def test_a_key_of_31_bytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"k" * 31 + b"\n")
    with pytest.raises(ConfigError) as info:
        read_key(path)
    assert f"the key in {path} is 31 bytes; at least 32 are needed" in str(info.value)


def test_a_fifo_key_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO to read waits for a writer: the key reader must not (it runs at start
    and in the writer thread)."""
    path = tmp_path / "key"
    os.mkfifo(path)
    with pytest.raises(ConfigError) as info:
        read_key(path)
    assert str(info.value) == f"REDITUS_SIDECAR_AUDIT_KEY_FILE: {path}: is not a regular file"


def test_a_key_file_over_4_kib_and_its_line_end_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"k" * 4096 + b"\r\n")
    assert read_key(path) == b"k" * 4096
    path.write_bytes(b"k" * 4096 + b"\r\n\n")
    with pytest.raises(ConfigError) as info:
        read_key(path)
    assert str(info.value) == (
        f"REDITUS_SIDECAR_AUDIT_KEY_FILE: {path}: is 4099 bytes; a key is 32 to 4096 bytes"
    )


def test_a_sparse_gigabyte_key_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "key"
    with path.open("wb") as sparse:
        sparse.truncate(2**30)
    with pytest.raises(ConfigError, match="is 1073741824 bytes"):
        read_key(path)


def test_a_key_of_4097_bytes_without_a_line_end_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"k" * 4097)
    with pytest.raises(ConfigError, match="the key is 4097 bytes; at most 4096"):
        read_key(path)


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_key(tmp_path / "nope")
    assert str(info.value) == (
        f"REDITUS_SIDECAR_AUDIT_KEY_FILE: cannot read {tmp_path / 'nope'}: No such file or directory"
    )


def test_the_key_id_is_a_16_hex_digit_hmac() -> None:
    assert key_id(KEY) == hmac.new(KEY, b"key-id", hashlib.sha256).hexdigest()[:16]
    assert len(key_id(KEY)) == 16


def test_the_key_is_reread_at_most_once_a_second_and_only_when_it_changed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    clock: FakeClock,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.audit")
    monkeypatch.setattr(time, "monotonic", clock)
    path = tmp_path / "key"
    path.write_bytes(KEY)

    def replace(content: bytes) -> None:  # a new inode, as a mounted Secret's update
        (tmp_path / "key.new").write_bytes(content)
        (tmp_path / "key.new").replace(path)

    def digest_key(hasher: _UserHasher) -> bytes | None:
        got = hasher.digest("u-7")
        for key in (KEY, new_key):
            if got == hmac.new(key, b"u-7", hashlib.sha256).hexdigest():
                return key
        return None

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    hasher = _UserHasher(path)
    new_key = b"n" * 40
    assert hasher.key_id == key_id(KEY)
    replace(new_key)
    clock.now = 100.999
    assert digest_key(hasher) == KEY
    clock.now = 101.0  # exactly one interval after the start
    assert digest_key(hasher) == new_key
    assert hasher.key_id == key_id(new_key)
    assert messages().count("audit key reloaded") == 1
    replace(new_key)  # the same key again: re-read, not reported
    clock.now = 102.0
    assert digest_key(hasher) == new_key
    assert messages().count("audit key reloaded") == 1
    path.unlink()  # gone for a moment: the key stays, quietly
    clock.now = 103.0
    assert digest_key(hasher) == new_key
    assert "audit key not reloaded; the previous key stays" not in messages()
    replace(b"short")  # a bad key: reported once, the key stays
    for now in (104.5, 105.5):  # more than an interval apart
        clock.now = now
        assert digest_key(hasher) == new_key
    assert messages().count("audit key not reloaded; the previous key stays") == 1


# --- records ------------------------------------------------------------------------------


async def test_a_record_holds_exactly_these_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    audit, registry = make_audit(tmp_path, key_file=key_file)
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: 1700000123.0625)  # .062 s after 22:15:23
        audit.submit(**{**RECORD, "caller": Caller(uid=7, gid=8, pid=9)})
        audit.submit(**{**RECORD, "caller": Caller(uid=7, gid=None, pid=None)})
        audit.submit(**RECORD)
    audit.start()
    await audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    common = {
        "audit": True,
        "time": "2023-11-14T22:15:23.062Z",
        "request_id": "r-1",
        "product": "default",
        "product_id": "p-1",
        "version": 3,
        "issued_at": 1700000000,
        "user_hmac": hmac.new(KEY, b"u-1", hashlib.sha256).hexdigest(),
        "user_key_id": key_id(KEY),
    }
    assert lines == [
        {**common, "caller": {"uid": 7, "gid": 8, "pid": 9}},
        {**common, "caller": {"uid": 7, "via": "tcp"}},
        {**common, "caller": "tcp"},
    ]
    assert written(registry) == 3
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600


async def test_without_a_key_there_is_no_user_field(tmp_path: Path) -> None:
    target = FakeTarget()
    audit, _registry = make_audit(tmp_path, target=target)
    audit.submit(**RECORD)
    audit.start()
    await audit.close()
    (line,) = target.writes
    assert set(json.loads(line)) == {
        "audit", "time", "request_id", "product", "product_id", "version", "issued_at", "caller",
    }  # fmt: skip


async def test_records_queued_before_close_are_written_then_the_writer_stops(
    tmp_path: Path,
) -> None:
    target = FakeTarget(hold=True)
    audit, registry = make_audit(tmp_path, target=target)
    audit.start()
    audit.submit(**RECORD)
    assert await asyncio.to_thread(target.entered.wait, 10)
    audit.submit(**RECORD)
    audit.submit(**RECORD)
    closing = asyncio.ensure_future(audit.close())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while audit._queue.qsize() < 3:  # two records and the end mark behind them
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    target.release.set()
    await closing
    assert target.batch_sizes() == [1, 2]
    assert written(registry) == 3
    assert target.closed  # the writer saw the end mark inside the batch and stopped


# --- the queue and the writer thread ------------------------------------------------------


async def test_the_queue_holds_exactly_queue_limit_records_written_in_batches(
    tmp_path: Path,
) -> None:
    target = FakeTarget()
    audit, registry = make_audit(tmp_path, target=target)
    for _ in range(QUEUE_LIMIT):  # not started yet: everything waits in the queue
        assert audit.submit(**RECORD) is None
    assert errors(registry, "queue_full") == 0
    assert audit.submit(**RECORD) is None
    assert errors(registry, "queue_full") == 1
    audit.start()
    await audit.close()
    assert target.batch_sizes() == [BATCH] * (QUEUE_LIMIT // BATCH)
    assert (QUEUE_LIMIT, BATCH) == (4096, 256)
    assert written(registry) == QUEUE_LIMIT
    assert target.closed


async def test_open_mode_hands_back_no_future(tmp_path: Path) -> None:
    audit, _registry = make_audit(tmp_path, target=FakeTarget())
    audit.start()
    assert audit.submit(**RECORD) is None
    await audit.close()


async def test_closed_mode_a_full_queue_refuses_at_once(tmp_path: Path) -> None:
    target = FakeTarget(hold=True)
    audit, registry = make_audit(tmp_path, closed=True, target=target)
    audit.start()
    first = audit.submit(**RECORD)
    assert await asyncio.to_thread(target.entered.wait, 10)  # the writer holds it
    queued = [audit.submit(**RECORD) for _ in range(QUEUE_LIMIT)]
    refused = audit.submit(**RECORD)
    assert refused is not None
    assert refused.done()
    assert refused.result() is False
    assert errors(registry, "queue_full") == 1
    target.release.set()
    assert first is not None
    assert await asyncio.wait_for(first, 10) is True
    results = await asyncio.wait_for(asyncio.gather(*queued), 10)  # type: ignore[arg-type]
    assert all(results)
    await audit.close()
    assert target.batch_sizes() == [1] + [BATCH] * (QUEUE_LIMIT // BATCH)


async def test_a_request_that_gave_up_does_not_stop_the_others_of_its_batch(
    tmp_path: Path,
) -> None:
    target = FakeTarget(hold=True)
    audit, _registry = make_audit(tmp_path, closed=True, target=target)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    audit.start()
    audit.submit(**RECORD)
    assert await asyncio.to_thread(target.entered.wait, 10)
    gone, waiting = audit.submit(**RECORD), audit.submit(**RECORD)
    assert gone is not None
    assert waiting is not None
    gone.cancel()
    target.release.set()
    assert await asyncio.wait_for(waiting, 10) is True
    await audit.close()
    loop.set_exception_handler(None)
    assert loop_errors == []


async def test_close_before_start_and_twice_returns(tmp_path: Path) -> None:
    audit, _registry = make_audit(tmp_path, target=FakeTarget())
    await audit.close()
    audit.start()
    await audit.close()
    await audit.close()


async def test_close_gives_up_on_a_hung_target_after_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit_module, "CLOSE_TIMEOUT", 0.05)
    target = FakeTarget(hold=True)
    audit, registry = make_audit(tmp_path, target=target)
    audit.start()
    audit.submit(**RECORD)
    assert await asyncio.to_thread(target.entered.wait, 10)
    audit.submit(**RECORD)
    audit.submit(**RECORD)
    await audit.close()  # returns although the writer is stuck
    assert not target.closed
    assert errors(registry, "exit") == 3  # the one being written and the two behind it
    assert [r.count for r in caplog.records if r.getMessage().startswith("audit records lost")] == [
        3
    ]  # type: ignore[attr-defined]
    target.release.set()


async def test_closed_mode_a_failed_write_answers_false(tmp_path: Path) -> None:
    target = FakeTarget(error=OSError(28, "No space left on device"))
    audit, registry = make_audit(tmp_path, closed=True, target=target)
    audit.start()
    pending = audit.submit(**RECORD)
    assert pending is not None
    assert await asyncio.wait_for(pending, 10) is False
    await audit.close()
    assert errors(registry, "write") == 1
    assert written(registry) == 0


def test_write_failures_are_reported_once_per_interval_then_recovery_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.audit")
    clock = FakeClock(0.0)  # a monotonic clock may start at zero: the first failure still logs
    monkeypatch.setattr(time, "monotonic", clock)
    target = FakeTarget()
    audit, registry = make_audit(tmp_path, target=target)

    def reports() -> list[tuple[int, str]]:
        return [
            (r.count, r.error)  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "audit records could not be written"
        ]

    def recoveries() -> int:
        return [r.getMessage() for r in caplog.records].count("audit records are written again")

    audit._write([entry()])  # all well from the start: nothing to recover from
    assert recoveries() == 0
    target.error = OSError(28, "No space left on device")
    audit._write([entry(), entry()])
    assert reports() == [(2, "No space left on device")]
    clock.now = 9.999
    target.error = OSError("no errno")
    audit._write([entry()])
    assert reports() == [(2, "No space left on device")]
    clock.now = 10.0
    audit._write([entry(), entry(), entry()])
    assert reports() == [(2, "No space left on device"), (4, "OSError")]
    clock.now = 25.0  # well past the interval
    audit._write([entry()])
    assert reports() == [(2, "No space left on device"), (4, "OSError"), (1, "OSError")]
    assert errors(registry, "write") == 7
    target.error = None
    for _ in range(2):
        audit._write([entry()])
    assert recoveries() == 1
    assert written(registry) == 3


# --- the file target ----------------------------------------------------------------------


def open_on(path: Path) -> int:
    """Descriptors of this process open on `path`."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in os.listdir(fds):
        try:
            if os.readlink(fds / fd) == str(path):
                count += 1
        except OSError:
            continue
    return count


def test_the_file_is_kept_open_then_reopened_when_moved_or_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.log"
    opens: list[str] = []
    real_open = os.open

    def counting_open(name: Any, *args: Any, **kwargs: Any) -> int:
        if "dir_fd" in kwargs:  # the file, opened from its directory
            opens.append(str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    target = _FileTarget(path)
    target.write([b"one\n"])
    target.write([b"two\n"])
    assert opens == [path.name]  # kept open while it is the same file
    path.rename(tmp_path / "a.log.1")
    target.write([b"three\n"])
    path.unlink()
    target.write([b"four\n"])
    assert len(opens) == 3
    assert (tmp_path / "a.log.1").read_bytes() == b"one\ntwo\n"
    assert path.read_bytes() == b"four\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert open_on(path) == 1
    path.rename(tmp_path / "a.log.2")  # logrotate's create mode: moved, a new file made
    path.touch()
    target.write([b"five\n"])
    assert (tmp_path / "a.log.2").read_bytes() == b"four\n"
    assert path.read_bytes() == b"five\n"
    target.close()
    assert open_on(path) == 0
    target.close()


def test_a_new_file_with_a_lower_inode_than_the_open_one_is_reopened(tmp_path: Path) -> None:
    """The open file is kept only while the path names that very file: a rotation whose new
    file got a lower inode number (a reused one) must be followed like any other."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.touch()
    second.touch()
    low, high = sorted((first, second), key=lambda p: p.stat().st_ino)
    path = tmp_path / "a.log"
    high.rename(path)
    target = _FileTarget(path)
    target.write([b"one\n"])
    path.rename(tmp_path / "a.log.1")
    low.rename(path)
    target.write([b"two\n"])
    assert (tmp_path / "a.log.1").read_bytes() == b"one\n"
    assert path.read_bytes() == b"two\n"
    target.close()


def test_a_device_is_refused_and_not_left_open() -> None:
    target = _FileTarget(Path("/dev/full"))
    with pytest.raises(OSError, match="not a regular file"):
        target.write([b"x\n"])
    assert open_on(Path("/dev/full")) == 0


def test_a_failing_close_still_forgets_the_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.log"
    target = _FileTarget(path)
    target.write([b"one\n"])
    real_close = os.close
    closed: list[int] = []

    def failing_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "close", failing_close)
    target.close()  # an error closing is not one writing: nothing to raise
    assert len(closed) == 1
    monkeypatch.undo()
    target.write([b"two\n"])  # opens afresh
    assert path.read_bytes() == b"one\ntwo\n"
    target.close()
    assert open_on(path) == 0


def test_the_writer_outlives_its_event_loop(tmp_path: Path) -> None:
    """Failing closed, a record finished after the loop closed has nobody to tell: the
    writer must go on with the next records instead of dying on the closed loop."""
    target = FakeTarget(hold=True)
    audit, registry = make_audit(tmp_path, closed=True, target=target)
    loop = asyncio.new_event_loop()

    async def begin() -> None:
        audit.start()
        audit.submit(**RECORD)

    loop.run_until_complete(begin())
    assert target.entered.wait(10)
    loop.close()
    target.release.set()
    audit.submit(**RECORD)
    deadline = time.monotonic() + 10
    while len(target.writes) < 2:
        assert time.monotonic() < deadline, "the writer stopped"
        threading.Event().wait(0.01)
    assert written(registry) == 2
    audit._queue.put(None)  # its loop is gone: stop the thread directly
