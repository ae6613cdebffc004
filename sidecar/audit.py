"""The issuance audit: one JSON line per issued token, written off the event loop.

The request path only puts a small record on a bounded queue; a writer thread formats,
hashes and writes in batches. A record names who minted what (caller, product, secret
version, request id) and never the token, the secret or the raw user id: the user is at
most an HMAC-SHA256 under a key of the operator's, so a known id can be searched for
without the log holding ids.

Failing open (the default), a record that cannot be written or queued is counted, reported
at a bounded rate and lost, and signing goes on. Failing closed, a token is released only
once its record is written, and a request whose record cannot be written gets 503, as
Vault refuses requests no audit device can record.

The target is whatever the path names when the writer opens it, so it is opened as an
attacker with write access to its directory would least like: the last component must be a
regular file, never a symlink (O_NOFOLLOW), FIFO or device, and opening never blocks
(O_NONBLOCK). A write that fails half-way (disk full) is cut back to the last whole record,
so the next record never glues onto a truncated line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import queue
import stat
import time
from pathlib import Path
from typing import NamedTuple

from . import logs
from .audit_key import key_id, read_key
from .blocking import start_in_thread
from .callers import Caller
from .config import AuditSettings
from .errors import ConfigError
from .metrics import Metrics

log = logging.getLogger(__name__)

QUEUE_LIMIT = 4096  # records waiting to be written; beyond it, drop (open) or refuse (closed)
BATCH = 256  # records written in one write() call at most
ERROR_LOG_INTERVAL = 10.0  # at most one "cannot write" line this often
KEY_CHECK_INTERVAL = 1.0  # the key file is checked for a new key at most this often
CLOSE_TIMEOUT = 2.0  # at shutdown, how long queued records get to reach the target
#: failing closed, how long a request waits for its record before it is answered 503
RECORD_TIMEOUT = 2.0
#: a write taking longer than this means the target is stuck (a hung mount, a full pipe)
STUCK_AFTER = 5.0
FILE_MODE = 0o600


class Entry(NamedTuple):
    """What the request path hands over; the writer thread makes the line. A tuple: it
    is built on the event loop per token, in a third of a frozen dataclass's time."""

    time: float
    request_id: str
    product: str
    product_id: str
    version: int
    issued_at: int
    caller: Caller | str
    user_id: str
    done: asyncio.Future[bool] | None  # closed mode: tells the request whether it was written


class _UserHasher:
    """HMAC-SHA256 of user ids under the key file's current key, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._file_stamp()
        self._key = read_key(path)
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256)  # the key hashed once
        self.key_id = key_id(self._key)
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < KEY_CHECK_INTERVAL:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            key = read_key(self.path)
        except ConfigError as exc:
            log.warning("audit key not reloaded; the previous key stays", extra={"error": str(exc)})
            return
        if key != self._key:
            self._key, self.key_id = key, key_id(key)
            self._mac = hmac.new(key, digestmod=hashlib.sha256)
            log.info("audit key reloaded", extra={"detail": f"key id {self.key_id}"})

    def digest(self, user_id: str) -> str:
        self._maybe_reload()
        mac = self._mac.copy()
        mac.update(user_id.encode("utf-8", "surrogatepass"))
        return mac.hexdigest()


class WriteFailed(Exception):
    """A batch failed after `written` whole records reached the target."""

    def __init__(self, written: int, error: str) -> None:
        super().__init__(error)
        self.written = written
        self.error = error


class _FileTarget:
    """An append-only regular file, reopened when it was moved or removed (logrotate's
    create mode) and after a failed write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._torn = False  # a partial line could not be cut back: start on a new line

    def _current(self) -> int:
        if self._fd is not None:
            try:
                st = os.lstat(self.path)
                own = os.fstat(self._fd)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                return self._fd
            self.close()
        self._fd = open_regular_file(self.path)
        return self._fd

    def write(self, lines: list[bytes]) -> None:
        fd = self._current()
        data = b"".join(lines)
        if self._torn:
            data = b"\n" + data
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, memoryview(data)[done:])
        except OSError as exc:
            whole = self._cut_back(fd, lines, done - self._torn)
            self.close()  # the next batch opens the file afresh
            raise WriteFailed(whole, exc.strerror or type(exc).__name__) from None
        self._torn = False

    def _cut_back(self, fd: int, lines: list[bytes], done: int) -> int:
        """After a short write of `done` bytes: truncate the partial record away, return
        how many whole records stay."""
        whole, end = 0, 0
        for line in lines:
            if end + len(line) > done:
                break
            whole, end = whole + 1, end + len(line)
        partial = done - end
        if partial > 0:
            try:
                os.ftruncate(fd, os.fstat(fd).st_size - partial)
                self._torn = False
            except OSError:
                self._torn = True
        return whole

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def open_regular_file(path: Path) -> int:
    """Open `path` to append, creating it (0600), from its directory: never through a
    symlink as its last component, never blocking (a FIFO with no reader fails at once),
    and only if it is a regular file."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path.name, flags | os.O_NONBLOCK, FILE_MODE, dir_fd=directory)
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


class _StdoutTarget:
    def write(self, lines: list[bytes]) -> None:
        try:
            logs.write_stdout(b"".join(lines).decode("utf-8"))
        except OSError as exc:
            raise WriteFailed(0, exc.strerror or type(exc).__name__) from None

    def close(self) -> None:
        pass


class AuditLog:
    """The queue and its writer thread; `submit` is the only call on the event loop."""

    def __init__(self, settings: AuditSettings, metrics: Metrics) -> None:
        self.fail_closed = settings.fail_closed
        self.target_name = settings.target
        self._target: _FileTarget | _StdoutTarget = (
            _StdoutTarget() if settings.target == "stdout" else _FileTarget(Path(settings.target))
        )
        self._hasher = _UserHasher(settings.key_file) if settings.key_file else None
        self._queue: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()
        self._written = metrics.audit_records
        self._write_errors = metrics.audit_errors.labels(reason="write")
        self._dropped = metrics.audit_errors.labels(reason="queue_full")
        self._lost_at_exit = metrics.audit_errors.labels(reason="exit")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: asyncio.Future[None] | None = None
        self._writing_since: float | None = None  # monotonic start of the write under way
        self._writing = 0  # records in it
        self._failing = False
        self._unreported = 0
        self._last_report = -ERROR_LOG_INTERVAL

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = start_in_thread(self._run, name="audit-writer")

    def submit(
        self,
        *,
        request_id: str,
        product: str,
        product_id: str,
        version: int,
        issued_at: int,
        caller: Caller | str,
        user_id: str,
    ) -> asyncio.Future[bool] | None:
        """Queue one record. Open: None (a full queue drops it, counted). Closed: a future
        telling whether it was written; False at once when the queue is full."""
        done = self._loop.create_future() if self.fail_closed and self._loop else None
        if self._queue.qsize() >= QUEUE_LIMIT:
            self._dropped.inc()
            if done is not None:
                done.set_result(False)
            return done
        self._queue.put(
            Entry(
                time.time(),
                request_id,
                product,
                product_id,
                version,
                issued_at,
                caller,
                user_id,
                done,
            )
        )
        return done

    async def recorded(self, pending: asyncio.Future[bool]) -> bool:
        """Failing closed: whether the record got written, waiting RECORD_TIMEOUT at most (a
        target that hangs must not hang the request)."""
        try:
            return await asyncio.wait_for(asyncio.shield(pending), RECORD_TIMEOUT)
        except TimeoutError:
            return False

    @property
    def stuck(self) -> bool:
        """A write has been under way for STUCK_AFTER or longer."""
        since = self._writing_since
        return since is not None and time.monotonic() - since >= STUCK_AFTER

    async def close(self) -> None:
        """Write what is queued (bounded by CLOSE_TIMEOUT), then stop the thread; what did
        not make it is counted and logged as lost."""
        if self._thread is None:
            return
        self._queue.put(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._thread), CLOSE_TIMEOUT)
        if not self._thread.done():
            lost = max(0, self._queue.qsize() - 1) + self._writing  # less the stop marker
            if lost:
                self._lost_at_exit.inc(lost)
                log.error(
                    "audit records lost at exit: the target did not take them in time",
                    extra={"count": lost, "detail": self.target_name},
                )
        self._thread = None

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                batch: list[Entry] = []
                stop = first is None
                if first is not None:
                    batch.append(first)
                while not stop and len(batch) < BATCH:
                    try:
                        entry = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if entry is None:
                        stop = True
                    else:
                        batch.append(entry)
                if batch:
                    self._write(batch)
                if stop:
                    return
        finally:
            self._target.close()

    def _write(self, batch: list[Entry]) -> None:
        written, error = 0, ""
        try:
            lines = [self._line(entry).encode("utf-8") for entry in batch]
        except Exception:  # a bug of ours: the thread must live, no request may wait forever
            log.exception("audit records could not be formatted")
            lines = []
        if lines:
            self._writing, self._writing_since = len(lines), time.monotonic()
            try:
                self._target.write(lines)
                written = len(lines)
            except WriteFailed as exc:
                written, error = exc.written, exc.error
            except OSError as exc:  # opening it failed
                error = exc.strerror or type(exc).__name__
            finally:
                self._writing, self._writing_since = 0, None
        if written:
            self._written.inc(written)
        if written < len(batch):
            self._write_errors.inc(len(batch) - written)
            if lines:
                self._report_failure(len(batch) - written, error)
        elif self._failing:
            self._failing = False
            log.info("audit records are written again")
        for ok, part in ((True, batch[:written]), (False, batch[written:])):
            waiting = [entry.done for entry in part if entry.done is not None]
            if waiting and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    self._loop.call_soon_threadsafe(_settle, waiting, ok)

    def _report_failure(self, count: int, error: str) -> None:
        self._failing = True
        self._unreported += count
        now = time.monotonic()
        if now - self._last_report >= ERROR_LOG_INTERVAL:
            log.error(
                "audit records could not be written",
                extra={"count": self._unreported, "error": error},
            )
            self._unreported = 0
            self._last_report = now

    def _line(self, entry: Entry) -> str:
        record: dict[str, object] = {
            "audit": True,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.time))
            + f".{int(entry.time * 1000) % 1000:03d}Z",
            "request_id": entry.request_id,
            "product": entry.product,
            "product_id": entry.product_id,
            "version": entry.version,
            "issued_at": entry.issued_at,
            "caller": entry.caller.as_json() if isinstance(entry.caller, Caller) else entry.caller,
        }
        if self._hasher is not None:
            record["user_hmac"] = self._hasher.digest(entry.user_id)
            record["user_key_id"] = self._hasher.key_id
        return json.dumps(record) + "\n"


def _settle(futures: list[asyncio.Future[bool]], ok: bool) -> None:
    for future in futures:
        if not future.done():
            future.set_result(ok)
