"""Structured logs on stdout: one JSON object per line (or plain text for humans).

Call sites pass context in `extra=`; only keys listed in `CONTEXT_KEYS` are emitted,
so nothing a caller sends and no secret can slip into a line by accident.

A line is formatted where it is logged and written by a thread of its own: stdout is a
pipe the runtime drains, and when it stops draining a write blocks. The event loop only
puts the line on a bounded queue (a full queue drops it, and the next line written says
how many were lost), so a stuck stdout costs log lines, never the loop, the probes or
SIGTERM. Lines go to file descriptor 1 directly, not through `sys.stdout`, whose buffer
lock a stuck writer would hold when the interpreter exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import sys
import threading
import time

CONTEXT_KEYS = (
    "request_id",
    "product",
    "product_id",
    "version",
    "previous_version",
    "source",
    "error",
    "status",
    "code",
    "detail",
    "address",
    "method",
    "ttl",
    "retry_in",
    "listener",
    "count",
)


#: held while anything goes to stdout: audit records written from their thread never
#: interleave with log lines
STDOUT_LOCK = threading.Lock()
QUEUE_LIMIT = 10_000  # log lines waiting for stdout; beyond it they are dropped, and counted
FLUSH_TIMEOUT = 2.0  # at exit, how long queued lines get to reach stdout


def _stdout_fd() -> int | None:
    """Descriptor 1 as sys.stdout names it; None when a test's capture replaced it."""
    try:
        return sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def write_stdout(text: str) -> None:
    """Write whole lines to stdout between log records; raises OSError as the stream does.
    Blocks while stdout does: call it from a thread, never from the event loop."""
    data = text.encode("utf-8", "backslashreplace")
    with STDOUT_LOCK:
        fd = _stdout_fd()
        if fd is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # a non-blocking pipe shared with us: wait until writable
                select.select([], [fd], [])


class QueuedStdoutHandler(logging.Handler):
    """Formats on the logging thread, writes on a writer thread of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._lines: queue.Queue[str | None] = queue.Queue(QUEUE_LIMIT)
        self._dropped = 0  # counted by loggers, read by the writer: a racy count is fine
        self._reported = 0
        self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        if self._write_now(line):
            return
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self._dropped += 1

    def _write_now(self, line: str) -> bool:
        """Write the line at once when that cannot block: nothing queued before it, stdout
        free, and the kernel ready to take it whole (a pipe takes up to PIPE_BUF bytes
        atomically once poll says it is writable). Lines then reach stdout in the order they
        were logged, as a plain handler writes them; only a stuck stdout defers them."""
        data = line.encode("utf-8", "backslashreplace")
        if len(data) > select.PIPE_BUF or self._behind():
            return False
        if not STDOUT_LOCK.acquire(blocking=False):
            return False
        try:
            fd = _stdout_fd()
            if fd is None or self._behind():  # queued meanwhile: keep the order
                return False
            try:
                return bool(select.select([], [fd], [], 0)[1]) and os.write(fd, data) == len(data)
            except OSError:
                return False
        finally:
            STDOUT_LOCK.release()

    def _behind(self) -> bool:
        """Lines are queued, or dropped lines not yet reported: the writer speaks first."""
        return bool(self._lines.unfinished_tasks) or self._dropped != self._reported

    def _drain(self) -> None:
        while True:
            taken = [self._lines.get()]
            while len(taken) < 256 and taken[-1] is not None:
                try:
                    taken.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            text = "".join(line for line in taken if line is not None)
            dropped = self._dropped - self._reported
            if dropped:
                self._reported += dropped
                text = self._dropped_line(dropped) + text
            with contextlib.suppress(OSError):  # stdout is gone: nowhere left to say so
                write_stdout(text)
            for _ in taken:
                self._lines.task_done()
            if taken[-1] is None:
                return

    def _dropped_line(self, count: int) -> str:
        record = logging.LogRecord(
            __name__, logging.WARNING, __file__, 0, "log lines dropped: stdout did not drain",
            None, None,
        )  # fmt: skip
        record.count = count
        return self.format(record) + "\n"

    def flush(self) -> None:
        """Wait until the queued lines are written, at most FLUSH_TIMEOUT (logging's
        shutdown calls it at exit: lines of a one-shot command must not be lost)."""
        deadline = time.monotonic() + FLUSH_TIMEOUT
        with self._lines.all_tasks_done:
            while self._lines.unfinished_tasks and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._lines.all_tasks_done.wait(remaining):
                    return

    def close(self) -> None:
        """Stop the writer after what is queued, bounded; a stuck stdout keeps it (a daemon)."""
        self.flush()
        with contextlib.suppress(queue.Full):
            self._lines.put_nowait(None)
        self._thread.join(FLUSH_TIMEOUT if self._thread.is_alive() else 0)
        super().close()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{key}={record.__dict__[key]}"
            for key in CONTEXT_KEYS
            if record.__dict__.get(key) is not None
        )
        line = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        line = f"{line} {context}" if context else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: str = "json") -> None:
    """Route every logger (ours, aiohttp's, hvac's) to stdout in one format."""
    for old in logging.getLogger().handlers:
        if isinstance(old, QueuedStdoutHandler):
            old.close()
    handler = QueuedStdoutHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would carry paths and client details per request; off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
