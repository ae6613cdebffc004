"""The log formats: text for people (the message, the context keys, then any traceback),
and configure() picking the one asked for."""

from __future__ import annotations

import logging
import sys

import pytest

from sidecar.logs import TextFormatter, configure


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
        root.handlers[:], level = saved
        root.setLevel(level)
    out = capsys.readouterr().out
    assert line in out
    assert out.startswith("{") == (fmt == "json")
