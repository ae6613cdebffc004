"""The file source: changes, atomic swaps, invalid content and deletion."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest

from sidecar.errors import SecretInvalid, SecretUnavailable
from sidecar.sources.base import material_from_mapping
from sidecar.sources.file import FileSource
from tests.support import write_secret


def source(path: Path) -> FileSource:
    return FileSource(path, product_id_key="product_id", secret_key="product_secret")


async def test_reads_and_versions_count_changes(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_secret(path, "p1", "secret-one")
    src = source(path)
    first = await src.fetch()
    assert (first.product_id, first.secret.reveal(), first.version) == ("p1", "secret-one", 1)
    assert not await src.changed()
    assert (await src.fetch()).version == 1  # same content, same version
    write_secret(path, "p1", "secret-two")
    assert await src.changed()
    second = await src.fetch()
    assert (second.secret.reveal(), second.version) == ("secret-two", 2)


async def test_a_change_of_the_product_id_alone_is_a_new_version(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_secret(path, "p1", "same-secret")
    src = source(path)
    assert (await src.fetch()).version == 1
    write_secret(path, "p2", "same-secret")
    material = await src.fetch()
    assert (material.product_id, material.version) == ("p2", 2)


async def test_follows_the_kubernetes_symlink_swap(tmp_path: Path) -> None:
    # A secret volume: file -> ..data/file, ..data -> ..TIMESTAMP (swapped atomically).
    first, second = tmp_path / "..2026_01", tmp_path / "..2026_02"
    first.mkdir()
    second.mkdir()
    (first / "s.json").write_text(json.dumps({"product_id": "p", "product_secret": "one"}))
    (second / "s.json").write_text(json.dumps({"product_id": "p", "product_secret": "two"}))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "s.json").symlink_to("..data/s.json")
    src = source(tmp_path / "s.json")
    assert (await src.fetch()).secret.reveal() == "one"
    tmp_link = tmp_path / "..data_tmp"
    tmp_link.symlink_to(second.name)
    os.replace(tmp_link, tmp_path / "..data")
    assert await src.changed()
    material = await src.fetch()
    assert (material.secret.reveal(), material.version) == ("two", 2)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected an object"),
        ('{"product_id": "p"}', "missing field(s) 'product_secret'"),
        ('{"product_secret": "s"}', "missing field(s) 'product_id'"),
        (
            '{"product_id": "p", "product_secret": ""}',
            "'product_secret' must be a non-empty string",
        ),
        ('{"product_id": 12, "product_secret": "s"}', "'product_id' must be a non-empty string"),
        ("x" * 70000, "larger than"),
    ],
)
async def test_invalid_content_is_a_clear_error(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(SecretInvalid) as info:
        await source(path).fetch()
    assert needle in str(info.value)
    assert str(path) in str(info.value)


async def test_error_messages_never_quote_the_content(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"product_id": "p", "product_secret": "TOPSECRET-VALUE" ,,}')
    with pytest.raises(SecretInvalid) as info:
        await source(path).fetch()
    assert "TOPSECRET" not in str(info.value)


async def test_deleted_file_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_secret(path, "p", "one")
    src = source(path)
    await src.fetch()
    path.unlink()
    assert await src.changed()
    with pytest.raises(SecretUnavailable, match="no such file"):
        await src.fetch()
    write_secret(path, "p", "two")
    assert await src.changed()
    assert (await src.fetch()).secret.reveal() == "two"


class HungSource(FileSource):
    """A file whose read never returns, as on an unresponsive network mount (the one
    thing here that cannot be made real: a hung NFS server)."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            path, product_id_key="product_id", secret_key="product_secret", timeout=0.2
        )
        self.release = threading.Event()

    def _read(self) -> tuple[tuple[int, int, int, int], bytes]:
        self.release.wait(30)
        return super()._read()


async def test_a_hung_read_times_out_and_does_not_pile_up_threads(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_secret(path, "p", "one")
    src = HungSource(path)
    try:
        with pytest.raises(SecretUnavailable, match=r"no answer within 0\.2 s"):
            await src.fetch()
        # the first read is still stuck in its thread: the next attempt fails at once
        with pytest.raises(SecretUnavailable, match="an earlier read is still hung"):
            await src.fetch()
        assert not await src.changed()
        hung = [t for t in threading.enumerate() if t.name == "secret-file"]
        assert len(hung) == 1
    finally:
        src.release.set()
    for thread in hung:
        thread.join(10)
    # the mount answers again: once the late result has reached the loop, reads work
    for _ in range(100):
        with contextlib.suppress(SecretUnavailable):
            assert (await src.fetch()).secret.reveal() == "one"
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("reads did not recover after the hung one returned")


async def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "s.json"
    os.mkfifo(fifo)
    with pytest.raises(SecretUnavailable, match="is a FIFO, not a regular file"):
        await source(fifo).fetch()
    directory = tmp_path / "d.json"
    directory.mkdir()
    with pytest.raises(SecretUnavailable, match="is a directory, not a regular file"):
        await source(directory).fetch()


async def test_the_size_limit_is_64_kib_exactly(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    body = json.dumps({"product_id": "p", "product_secret": "s" * 64})
    path.write_text(body + " " * (64 * 1024 - len(body)))  # whitespace pads valid JSON
    assert (await source(path).fetch()).secret.reveal() == "s" * 64
    path.write_text(body + " " * (64 * 1024 + 1 - len(body)))
    with pytest.raises(SecretInvalid, match="larger than 65536 bytes"):
        await source(path).fetch()


def test_a_read_cannot_be_changed_after_the_fact() -> None:
    """The refresher compares and installs what a source returned: it must stay as read."""
    material = material_from_mapping(
        {"product_id": "p", "product_secret": "s"}, product_id_key="product_id",
        secret_key="product_secret", version=1, where="test",
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        material.version = 2  # type: ignore[misc]


async def test_a_file_that_fails_while_being_read_is_unavailable() -> None:
    """A regular file whose read fails (EIO, as on a failing network mount) is an
    unavailable secret with the reason, not a crash: /proc/self/mem at offset 0 does that."""
    src = source(Path("/proc/self/mem"))
    with pytest.raises(SecretUnavailable, match="cannot read: Input/output error"):
        await src.fetch()


async def test_a_path_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    """Any open error besides a missing file is named too (here: a file used as a directory)."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(SecretUnavailable, match="cannot read: Not a directory"):
        await source(tmp_path / "file" / "s.json").fetch()
