"""The `file` source: a JSON document rendered by Vault Agent, the CSI driver or a Secret.

The file is re-read when its identity or content changes: Kubernetes swaps secret
volumes through a `..data` symlink, Vault Agent renames a temp file over the target;
both change the inode the path resolves to, which `changed()` notices with one stat.

Every stat and read runs in a daemon thread with a timeout: a FIFO at the path, or a
hung network mount, must not freeze the event loop (and with it signing and probes).
The path is opened non-blocking (a FIFO opens at once) and anything but a regular file
is refused. At most one such call is outstanding: while one hangs, the next attempt
fails at once instead of piling up threads.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..blocking import start_in_thread
from ..errors import SecretInvalid, SecretUnavailable
from .base import SecretMaterial, material_from_mapping

MAX_FILE_BYTES = 64 * 1024
READ_TIMEOUT = 5.0  # seconds a stat or read of the file may take

_Signature = tuple[int, int, int, int]
T = TypeVar("T")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class FileSource:
    """Reads `{"product_id": ..., "product_secret": ...}` (field names configurable)."""

    def __init__(
        self,
        path: Path,
        *,
        product_id_key: str,
        secret_key: str,
        timeout: float = READ_TIMEOUT,
    ) -> None:
        self.path = path
        self.description = f"file {path}"
        self.timeout = timeout
        self._product_id_key = product_id_key
        self._secret_key = secret_key
        self._signature: _Signature | None = None
        self._last: SecretMaterial | None = None
        self._loads = 0
        self._pending: asyncio.Future[object] | None = None
        self._turn = asyncio.Lock()  # the watcher's stat and the refresher's read take turns

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        """Run a stat or read in a thread, bounded by the timeout; one at a time."""
        async with self._turn:
            if self._pending is not None and not self._pending.done():
                raise SecretUnavailable(
                    f"{self.description}: an earlier read is still hung "
                    "(an unresponsive network mount?)"
                )
            future = start_in_thread(fn, name="secret-file")
            self._pending = future  # type: ignore[assignment]
            try:
                # shielded: on timeout the thread goes on, and `_pending` must say so
                return await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except TimeoutError:
                raise SecretUnavailable(
                    f"{self.description}: no answer within {self.timeout:g} s "
                    "(an unresponsive network mount?)"
                ) from None

    def _stat(self) -> _Signature | None:
        try:
            return _signature(os.stat(self.path))  # follows symlinks: the ..data swap
        except OSError:
            return None

    async def changed(self) -> bool:
        try:
            return await self._off_loop(self._stat) != self._signature
        except SecretUnavailable:
            return False  # the next scheduled read reports it

    def _read(self) -> tuple[_Signature, bytes]:
        """Open without blocking (a FIFO would block), refuse non-files, read a bounded amount."""
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise SecretUnavailable(f"{self.description}: no such file") from None
        except OSError as exc:
            raise SecretUnavailable(f"{self.description}: cannot read: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SecretUnavailable(
                f"{self.description}: is {_kind(st.st_mode)}, not a regular file "
                "(REDITUS_SIDECAR_SECRET_FILE must name a file, or a symlink to one)"
            )
        with os.fdopen(fd, "rb") as handle:
            try:
                return _signature(st), handle.read(MAX_FILE_BYTES + 1)
            except OSError as exc:
                raise SecretUnavailable(
                    f"{self.description}: cannot read: {exc.strerror}"
                ) from None

    async def fetch(self) -> SecretMaterial:
        try:
            signature, raw = await self._off_loop(self._read)
        except SecretUnavailable:
            self._signature = None
            raise
        self._signature = signature
        if len(raw) > MAX_FILE_BYTES:
            raise SecretInvalid(f"{self.description}: larger than {MAX_FILE_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            # The decoder's message may quote the content; it is never passed on.
            raise SecretInvalid(f"{self.description}: not valid JSON") from None
        material = material_from_mapping(
            data,
            product_id_key=self._product_id_key,
            secret_key=self._secret_key,
            version=self._loads + 1,
            where=self.description,
        )
        last = self._last
        if last and (last.product_id, last.secret) == (material.product_id, material.secret):
            return last
        self._loads += 1
        self._last = material
        return material

    async def close(self) -> None:
        return None
