"""Structured logs on stdout: one JSON object per line (or plain text for humans).

Call sites pass context in `extra=`; only keys listed in `CONTEXT_KEYS` are emitted,
so nothing a caller sends and no secret can slip into a line by accident.
"""

from __future__ import annotations

import json
import logging
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
STDOUT_LOCK = threading.RLock()


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def createLock(self) -> None:  # logging's name
        self.lock = STDOUT_LOCK


def write_stdout(text: str) -> None:
    """Write whole lines to stdout between log records; raises OSError as the stream does."""
    with STDOUT_LOCK:
        sys.stdout.write(text)
        sys.stdout.flush()


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
    handler = _StdoutHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would carry paths and client details per request; off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
