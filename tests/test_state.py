"""SecretStore with a fake monotonic clock: staleness boundaries, peek and readiness."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sidecar.redact import Redacted
from sidecar.signer import TokenSigner
from sidecar.state import SecretStore, Snapshot
from tests.support import FakeClock


def snapshot(version: int = 1) -> Snapshot:
    return Snapshot(signer=TokenSigner("p", Redacted("s" * 64)), version=version, loaded_at=0.0)


def test_a_secret_serves_up_to_max_staleness_and_not_a_moment_longer(clock: FakeClock) -> None:
    store = SecretStore(["a"], max_staleness=30.0, monotonic=clock)
    assert store.age("a") == math.inf
    assert store.current("a") is None
    store.replace("a", snapshot())
    clock.now += 30.0
    assert store.age("a") == 30.0
    assert store.current("a") is not None  # exactly the limit still serves
    clock.now += 0.5
    assert store.current("a") is None
    assert store.peek("a") is not None  # change detection still sees it
    store.confirm("a")  # the source answered: fresh again
    assert store.age("a") == 0.0
    assert store.current("a") is not None


def test_zero_max_staleness_never_goes_stale() -> None:
    clock = FakeClock(0.0)
    store = SecretStore(["a"], monotonic=clock)
    store.replace("a", snapshot())
    clock.now += 1e9
    assert store.current("a") is not None


def test_ready_needs_every_product_and_no_shutdown() -> None:
    store = SecretStore(["a", "b"])
    assert not store.ready()
    store.replace("a", snapshot())
    assert not store.ready()  # b is still missing
    store.replace("b", snapshot(2))
    assert store.ready()
    assert store.current("b").version == 2  # type: ignore[union-attr]
    store.shutting_down = True
    assert not store.ready()


def test_a_snapshot_cannot_be_changed_in_place() -> None:
    """The API may hold a snapshot while the refresher swaps in the next: never half a secret."""
    snap = snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 2  # type: ignore[misc]
