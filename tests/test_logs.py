"""The log formats: text for people (the message, the context keys, then any traceback),
and configure() picking the one asked for."""

from __future__ import annotations

import json
import logging
import os
import queue
import sys

import pytest

from sidecar import logs
from sidecar.logs import JsonFormatter, TextFormatter, configure


def record(message: str, exc_info: object = None, **context: object) -> logging.LogRecord:
    entry = logging.LogRecord("sidecar.x", logging.WARNING, __file__, 1, message, None, None)
    entry.exc_info = exc_info  # type: ignore[assignment]
    entry.__dict__.update(context)
    return entry


def test_text_lines_carry_the_listed_context_and_the_traceback() -> None:
    text = TextFormatter()
    assert text.format(record("plain")) == "warning sidecar.x: plain"
    line = text.format(record("refused", product="shop", code="x", user_id="u-1"))
    assert line == "warning sidecar.x: refused product=shop code=x"  # listed keys only
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failure = sys.exc_info()
    first, *trace = text.format(record("failed", failure, product="shop")).split("\n")
    assert first == "warning sidecar.x: failed product=shop"
    assert trace[0] == "Traceback (most recent call last):"
    assert trace[-1] == "RuntimeError: boom"


@pytest.mark.parametrize(
    ("fmt", "line"),
    [("text", "warning sidecar.x: plain"), ("json", '"msg": "plain"')],
)
def test_configure_picks_the_format_asked_for(
    fmt: str, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("info", fmt)
        logging.getLogger("sidecar.x").warning("plain")
    finally:
        for handler in root.handlers:
            handler.close()  # writes what is queued
        root.handlers[:], level = saved
        root.setLevel(level)
    out = capsys.readouterr().out
    assert line in out
    assert out.startswith("{") == (fmt == "json")


def test_a_stuck_stdout_drops_lines_counted_and_never_blocks_the_logger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While stdout cannot be written (its lock is held, as by a writer blocked on a full
    pipe), logging returns at once; lines beyond the queue are dropped, and the first line
    written afterwards says how many."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdout", os.fdopen(write_end, "w"))
    monkeypatch.setattr(logs, "QUEUE_LIMIT", 10)
    handler = logs.QueuedStdoutHandler()
    handler.setFormatter(JsonFormatter())
    with logs.STDOUT_LOCK:
        for n in range(50):
            handler.emit(record(f"line {n}"))
    handler.close()
    sys.stdout.close()
    with os.fdopen(read_end) as pipe:
        lines = [json.loads(line) for line in pipe.read().splitlines()]
    assert lines[0]["msg"] == "log lines dropped: stdout did not drain"
    kept = [int(line["msg"].removeprefix("line ")) for line in lines[1:]]
    assert kept == sorted(kept)
    assert lines[0]["count"] + len(kept) == 50
    assert len(kept) >= 10  # the queue's worth, and what the writer had taken before


@pytest.mark.parametrize("behind", ["nothing", "a queued line", "dropped lines"])
def test_a_line_is_written_at_once_only_when_nothing_must_come_before_it(
    monkeypatch: pytest.MonkeyPatch, behind: str
) -> None:
    """The writer thread is parked on a queue of its own, so only the handler's direct write
    can reach the pipe: it does when stdout is free and nothing waits ahead of the line; a
    queued line or an unreported drop keeps the order by queueing this one too."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    monkeypatch.setattr(sys, "stdout", os.fdopen(write_end, "w"))
    handler = logs.QueuedStdoutHandler()
    handler.setFormatter(TextFormatter())
    handler._lines = queue.Queue()  # the writer keeps waiting on the queue it started with
    if behind == "a queued line":
        handler._lines.put("earlier\n")
    elif behind == "dropped lines":
        handler._dropped = 3
    handler.emit(record("now"))
    try:
        written = os.read(read_end, 4096)
    except BlockingIOError:
        written = b""
    assert written == (b"warning sidecar.x: now\n" if behind == "nothing" else b"")
    os.close(read_end)
