"""The text log format, for people: the message, the context keys, then any traceback."""

from __future__ import annotations

import logging
import sys

from sidecar.logs import TextFormatter


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
