"""The audit key: read from the operator's file, checked, and named without revealing it.

A leaf below both `config` (a bad key is a configuration error, found at start) and
`audit` (which re-reads the key when the file changes).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from .errors import ConfigError

MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096  # a key file larger than this is a mistake (or an attack), not a key


def read_key(path: Path) -> bytes:
    """The audit key: the file's bytes without a trailing newline, 32 to 4096 of them. The
    file must be a regular one (symlinks are followed: a mounted Secret is one); a FIFO would
    block the reader, a huge file would be hashed again for every record."""
    where = f"REDITUS_SIDECAR_AUDIT_KEY_FILE: {path}"
    unreadable = "REDITUS_SIDECAR_AUDIT_KEY_FILE: cannot read {}: {}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(unreadable.format(path, exc.strerror)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: is not a regular file")
        if info.st_size > MAX_KEY_BYTES + 2:  # a key and its line end
            raise ConfigError(
                f"{where}: is {info.st_size} bytes; a key is {MIN_KEY_BYTES} to "
                f"{MAX_KEY_BYTES} bytes"
            )
        key = os.read(fd, MAX_KEY_BYTES + 3).rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(unreadable.format(path, exc.strerror)) from None
    finally:
        os.close(fd)
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"REDITUS_SIDECAR_AUDIT_KEY_FILE: the key in {path} is {len(key)} bytes; "
            f"at least {MIN_KEY_BYTES} are needed (e.g. head -c 32 /dev/urandom | base64)"
        )
    if len(key) > MAX_KEY_BYTES:
        raise ConfigError(f"{where}: the key is {len(key)} bytes; at most {MAX_KEY_BYTES}")
    return key


def key_id(key: bytes) -> str:
    """A public name of the key, so a rotation shows in the records without revealing it."""
    return hmac.new(key, b"key-id", hashlib.sha256).hexdigest()[:16]
