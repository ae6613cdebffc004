"""Redacted: equal by value (config and secret comparisons), yet never shown or pickled."""

from __future__ import annotations

import pickle

import pytest

from sidecar.redact import Redacted

SECRET = "hunter2-" + "s" * 40


def test_equal_by_value_not_by_identity() -> None:
    built = "".join(["hunter2-", "s" * 40])  # an equal string that is another object
    assert built is not SECRET
    assert Redacted(SECRET) == Redacted(built)
    assert hash(Redacted(SECRET)) == hash(Redacted(built))
    assert Redacted(SECRET) != Redacted(SECRET + "x")
    assert Redacted(SECRET + "x") != Redacted(SECRET)
    assert Redacted(SECRET) != SECRET  # a bare string is not a Redacted


def test_truth_is_whether_there_is_a_value() -> None:
    assert Redacted(SECRET)
    assert not Redacted("")


def test_never_shown_or_pickled() -> None:
    value = Redacted(SECRET)
    assert value.reveal() == SECRET
    assert SECRET not in repr(value)
    assert SECRET not in str(value)
    assert SECRET not in f"{value}"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(value)
