"""TLS towards Vault as Vault's own CLI sets it up, and the client certificate's life.

Trust: `VAULT_CACERT` (a PEM file or bundle) wins; otherwise every file under
`VAULT_CAPATH` (walked like the CLI's go-rootcerts does: each file must hold PEM
certificates, no `c_rehash` links needed); otherwise the CA bundle requests uses (certifi). The
client pair (`VAULT_CLIENT_CERT`/`VAULT_CLIENT_KEY`) is loaded into a fresh SSL context
whenever the files' stat signature changes, so a renewal by cert-manager (in place, or a
secret volume's `..data` symlink swap) is used without a restart. `VAULT_TLS_SERVER_NAME`
is sent as SNI and is the name the server certificate must carry.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
import requests.adapters

from ..config import VaultSettings
from ..errors import ConfigError

Signature = tuple[int, ...]
MAX_PEM_BYTES = 1024 * 1024


def ca_bundle(settings: VaultSettings) -> tuple[str | None, str]:
    """PEM text of the CAs to trust (None: the requests bundle) and where it came from."""
    if settings.cacert is not None:
        return _read_pem(settings.cacert, "VAULT_CACERT"), f"VAULT_CACERT={settings.cacert}"
    if settings.capath is not None:
        return _read_capath(settings.capath), f"VAULT_CAPATH={settings.capath}"
    return None, "the default CA bundle"


def _read_pem(path: Path, variable: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    text = data.decode("ascii", errors="replace")
    if len(data) > MAX_PEM_BYTES or "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"{variable}: {path} holds no PEM certificate")
    return text


def _read_capath(directory: Path) -> str:
    """Every file below the directory, like the Vault CLI: one that is not PEM is an error."""
    texts = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            texts.append(_read_pem(Path(root) / name, "VAULT_CAPATH"))
    if not texts:
        raise ConfigError(f"VAULT_CAPATH: {directory} holds no certificate")
    return "\n".join(texts)


def signature(*paths: Path) -> Signature | None:
    """Cheap change detector for files (through symlinks): None when one is missing."""
    parts: list[int] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return None
        parts += [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size]
    return tuple(parts)


@dataclass(frozen=True)
class ClientPair:
    """A client certificate and key as loaded: the signature they had, and their expiry."""

    signature: Signature
    not_after: datetime.datetime


class PairError(Exception):
    """The client certificate and key cannot be used together (yet): the message says why."""


def build_context(
    settings: VaultSettings, ca_pem: str | None
) -> tuple[ssl.SSLContext, ClientPair | None]:
    """A verifying context (or a non-verifying one for VAULT_SKIP_VERIFY) with the client
    pair loaded; raises PairError when the pair is unreadable or does not match."""
    context = ssl.create_default_context(cafile=None if ca_pem else certifi.where(), cadata=ca_pem)
    context.hostname_checks_common_name = False  # as Go (and urllib3): SANs only
    if settings.skip_verify and settings.cacert is None and settings.capath is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    pair = None
    cert, key = settings.client_cert, settings.client_key
    if cert is not None and key is not None:
        before = signature(cert, key)
        if before is None:
            raise PairError(f"VAULT_CLIENT_CERT={cert} or VAULT_CLIENT_KEY={key} does not exist")
        try:
            context.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as exc:
            reason = (
                "the private key does not match the certificate"
                if "KEY_VALUES_MISMATCH" in str(exc)
                else "not a PEM certificate and its unencrypted private key"
            )
            raise PairError(
                f"VAULT_CLIENT_CERT={cert} / VAULT_CLIENT_KEY={key}: {reason}"
            ) from None
        except OSError as exc:
            raise PairError(
                f"cannot read VAULT_CLIENT_CERT={cert} / {key}: {exc.strerror}"
            ) from None
        pair = ClientPair(before, not_after(cert))
    return context, pair


def not_after(path: Path) -> datetime.datetime:
    """The first certificate's notAfter, read from its DER (no X.509 library needed)."""
    try:
        text = path.read_text("ascii", errors="replace")
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(text[start:end])
        tbs = _children(_children(der)[0])
        fields = tbs[1:] if tbs[0][:1] == b"\xa0" else tbs  # skip the explicit [0] version
        validity = _children(fields[3])
        return _asn1_time(validity[1])
    except (OSError, ValueError, IndexError) as exc:
        raise PairError(f"VAULT_CLIENT_CERT={path}: cannot read its validity ({exc})") from None


def _children(tlv: bytes) -> list[bytes]:
    """The TLVs inside one DER constructed TLV (SEQUENCE or context tag)."""
    body = _value(tlv)
    items, i = [], 0
    while i < len(body):
        length, header = _length(body, i + 1)
        items.append(body[i : i + header + length])
        i += header + length
    return items


def _length(data: bytes, at: int) -> tuple[int, int]:
    """(content length, header length) of the TLV whose length byte is at `at`."""
    first = data[at]
    if first < 0x80:
        return first, 2
    count = first & 0x7F
    return int.from_bytes(data[at + 1 : at + 1 + count], "big"), 2 + count


def _value(tlv: bytes) -> bytes:
    length, header = _length(tlv, 1)
    return tlv[header : header + length]


def _asn1_time(tlv: bytes) -> datetime.datetime:
    text = _value(tlv).decode("ascii")
    fmt = "%y%m%d%H%M%SZ" if tlv[0] == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime / GeneralizedTime
    return datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.UTC)


class TLSAdapter(requests.adapters.HTTPAdapter):
    """requests has no per-session SSL context or server name: hand both to every urllib3
    pool, direct or through a proxy."""

    def __init__(self, context: ssl.SSLContext, server_name: str | None) -> None:
        self._tls: dict[str, Any] = {"ssl_context": context}
        if server_name:
            self._tls["server_hostname"] = server_name
            self._tls["assert_hostname"] = server_name
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **{**pool_kwargs, **self._tls})

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return super().proxy_manager_for(proxy, **{**proxy_kwargs, **self._tls})
