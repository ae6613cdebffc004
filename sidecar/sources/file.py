"""The `file` source: a JSON document rendered by Vault Agent, the CSI driver or a Secret.

The file is re-read when its identity or content changes: Kubernetes swaps secret
volumes through a `..data` symlink, Vault Agent renames a temp file over the target;
both change the inode the path resolves to, which `changed()` notices with one stat.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SecretInvalid, SecretUnavailable
from .base import SecretMaterial, material_from_mapping

MAX_FILE_BYTES = 64 * 1024

_Signature = tuple[int, int, int, int]


class FileSource:
    """Reads `{"product_id": ..., "product_secret": ...}` (field names configurable)."""

    def __init__(self, path: Path, *, product_id_key: str, secret_key: str) -> None:
        self.path = path
        self.description = f"file {path}"
        self._product_id_key = product_id_key
        self._secret_key = secret_key
        self._signature: _Signature | None = None
        self._last: SecretMaterial | None = None
        self._loads = 0

    def _stat(self) -> _Signature | None:
        try:
            st = os.stat(self.path)  # follows symlinks: the ..data swap shows as a new inode
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        return self._stat() != self._signature

    async def fetch(self) -> SecretMaterial:
        # The file is small and local; reading it inline is cheaper than a thread hop.
        signature = self._stat()
        try:
            with open(self.path, "rb") as handle:  # noqa: ASYNC230 - small local file
                raw = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            self._signature = None
            raise SecretUnavailable(f"{self.description}: no such file") from None
        except OSError as exc:
            self._signature = None
            raise SecretUnavailable(f"{self.description}: cannot read: {exc.strerror}") from None
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
