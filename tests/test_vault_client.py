"""sidecar/sources/vault_client.py in process, without Vault: how each failure of a call
(hvac's status exceptions, requests' transport errors, TLS alerts) becomes our error and
its message, Vault's error text as we quote it, Retry-After, the bound on a call (on a
fast-forwarded loop clock), and which TLS settings turn verification off.

The calls here raise what hvac or requests would raise, from inside the worker thread, so
every branch is reached without staging the failure on a network.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest
import requests

import sidecar.sources.vault_client as vault_client
from sidecar.config import load_settings
from sidecar.errors import SecretUnavailable
from sidecar.sources.vault_client import (
    VaultHTTPError,
    VaultTimeout,
    VaultTLSError,
    VaultTransport,
    VaultUnreachable,
    parse_retry_after,
)
from tests.openbao import make_ca, make_client_cert
from tests.support import answering_http

ADDR = "http://127.0.0.1:1"  # never dialled: the calls fail before any request


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA file, a directory holding it, and a client pair that CA signed."""
    tmp = tmp_path_factory.mktemp("client-pems")
    ca, key, cert = make_ca(tmp, "unit-ca")
    capath = tmp / "capath"
    capath.mkdir()
    (capath / "ca.pem").write_bytes(ca.read_bytes())
    client_cert, client_key = make_client_cert(tmp, "client", key, cert, common_name="unit")
    return {"ca": ca, "capath": capath, "cert": client_cert, "key": client_key}


def transport(**env: str) -> VaultTransport:
    return VaultTransport(
        load_settings(
            {
                "VAULT_ADDR": ADDR,
                "VAULT_TOKEN": "t",
                "REDITUS_SIDECAR_VAULT_TIMEOUT": "3",
                **env,
            }
        ).vault
    )


def raising(exc: BaseException) -> Callable[[Any], Any]:
    def call(client: Any) -> Any:
        raise exc

    return call


async def failure(t: VaultTransport, exc: BaseException) -> BaseException:
    """What `call` raises when hvac or requests raised `exc` in the worker thread."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the test checks the type
        await t.call(raising(exc), token=None)
    return caught.value


# --- Vault's error text -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("errors", "scrub", "said"),
    [
        (["permission denied"], (), "permission denied"),
        (["one", "two"], (), "one; two"),
        ([], (), "no error text"),
        (["a\n  b\tc "], (), "a b c"),
        (["invalid secret id s3cr3t-v4lue"], ("", "s3cr3t-v4lue"), "invalid secret id ********"),
        (
            ["  <html><body>502 Bad Gateway</body></html>"],
            (),
            "an HTML page, not a Vault answer (a proxy or load balancer said 502)",
        ),
    ],
)
def test_vault_error_text_as_quoted(errors: list[str], scrub: tuple[str, ...], said: str) -> None:
    assert VaultHTTPError(502, errors, None, None).said(scrub) == said


@pytest.mark.parametrize(("length", "said"), [(199, 199), (200, 200), (201, 200)])
def test_vault_error_text_is_cut_after_200_characters(length: int, said: int) -> None:
    text = VaultHTTPError(400, ["x" * length], None, None).said()
    assert text == "x" * said + ("..." if length > 200 else "")


# --- hvac's exceptions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (hvac.exceptions.InvalidRequest, 400),
        (hvac.exceptions.Unauthorized, 401),
        (hvac.exceptions.Forbidden, 403),
        (hvac.exceptions.InvalidPath, 404),
        (hvac.exceptions.PreconditionFailed, 412),
        (hvac.exceptions.RateLimitExceeded, 429),
        (hvac.exceptions.InternalServerError, 500),
        (hvac.exceptions.VaultNotInitialized, 501),
        (hvac.exceptions.BadGateway, 502),
        (hvac.exceptions.VaultDown, 503),
        (hvac.exceptions.UnexpectedError, 0),
        (hvac.exceptions.VaultError, 0),
    ],
)
async def test_an_hvac_error_without_a_response_takes_its_status_from_its_type(
    kind: type[hvac.exceptions.VaultError], status: int
) -> None:
    error = await failure(transport(), kind("refused here", json={"errors": []}))
    assert isinstance(error, VaultHTTPError)
    assert (error.status, error.errors, error.retry_after) == (status, ["refused here"], None)
    assert error.body == {"errors": []}


async def test_an_hvac_error_keeps_vaults_error_list_or_its_message() -> None:
    t = transport()
    error = await failure(t, hvac.exceptions.Forbidden(errors=["1 error occurred", "denied"]))
    assert isinstance(error, VaultHTTPError)
    assert error.errors == ["1 error occurred", "denied"]
    error = await failure(t, hvac.exceptions.Forbidden())
    assert isinstance(error, VaultHTTPError)
    assert error.errors == [""]


# --- requests' exceptions ---------------------------------------------------------------


def unreachable(reason: str) -> str:
    return (
        f"Vault at {ADDR} is unreachable ({reason}): check VAULT_ADDR and that Vault is "
        "running and reachable from here"
    )


NOT_JSON = (
    f"{ADDR} answered with something that is not Vault's JSON API: check VAULT_ADDR "
    "(and any proxy in between)"
)
CE = requests.exceptions.ConnectionError


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (
            requests.exceptions.ReadTimeout("Read timed out. (read timeout=3)"),
            VaultTimeout,
            f"Vault at {ADDR} did not answer within 3s (REDITUS_SIDECAR_VAULT_TIMEOUT): it is "
            "hung, overloaded or unreachable",
        ),
        (CE("[Errno 111] Connection refused"), VaultUnreachable, unreachable("connection refused")),
        (
            CE("[Errno -2] Name or service not known"),
            VaultUnreachable,
            unreachable("host name not found"),
        ),
        (
            CE("nodename nor servname provided"),
            VaultUnreachable,
            unreachable("host name not found"),
        ),
        (
            CE("[Errno 101] Network is unreachable"),
            VaultUnreachable,
            unreachable("no route to host"),
        ),
        (CE("[Errno 113] No route to host"), VaultUnreachable, unreachable("no route to host")),
        (CE("Remote end closed connection"), VaultUnreachable, unreachable("connection failed")),
        (
            CE("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"),
            VaultTLSError,
            f"TLS connection to Vault at {ADDR} failed (Vault requires a client certificate): "
            "set VAULT_CLIENT_CERT and VAULT_CLIENT_KEY to a certificate its listener trusts",
        ),
        (
            requests.exceptions.InvalidURL("Failed to parse"),
            VaultUnreachable,
            f"VAULT_ADDR={ADDR!r} is not a usable URL",
        ),
        (
            requests.exceptions.InvalidSchema("No connection adapters"),
            VaultUnreachable,
            f"VAULT_ADDR={ADDR!r} is not a usable URL",
        ),
        (ValueError("Expecting value: line 1 column 1"), VaultUnreachable, NOT_JSON),
        (
            requests.exceptions.TooManyRedirects("Exceeded 30 redirects."),
            VaultUnreachable,
            f"request to Vault at {ADDR} failed: TooManyRedirects",
        ),
    ],
)
async def test_transport_failures_become_our_errors(
    exc: Exception, kind: type[Exception], message: str
) -> None:
    error = await failure(transport(), exc)
    assert type(error) is kind
    assert str(error) == message


async def test_an_answer_that_is_not_json_is_not_vault() -> None:
    """hvac hands back the raw response when Vault's answer is not JSON."""
    page = requests.Response()
    page.status_code = 200
    page.headers["Content-Type"] = "text/html"
    with pytest.raises(VaultUnreachable) as caught:
        await transport().call(lambda client: page, token=None)
    assert str(caught.value) == NOT_JSON


# --- TLS failures, one message each -------------------------------------------------------


def tls_failed(detail: str, hint: str) -> str:
    return f"TLS connection to Vault at {ADDR} failed ({detail}): {hint}"


UNTRUSTED = (
    "Vault's certificate is not trusted: set VAULT_CACERT to the PEM file (or VAULT_CAPATH "
    "to a directory) of the CA that signed it"
)
NOT_FOR_ADDR = (
    "Vault's certificate is not valid for 127.0.0.1: use an address it names in VAULT_ADDR, "
    "or set VAULT_TLS_SERVER_NAME to a name it carries"
)
NEEDS_CERT = "set VAULT_CLIENT_CERT and VAULT_CLIENT_KEY to a certificate its listener trusts"
NO_TLS = "use http:// in VAULT_ADDR if Vault listens without TLS"
HANDSHAKE = "check VAULT_ADDR and the TLS settings (the default CA bundle)"


@pytest.mark.parametrize(
    ("text", "detail", "hint"),
    [
        (
            "certificate verify failed: self-signed certificate (_ssl.c:1006)",
            "certificate verify failed: self-signed certificate",
            UNTRUSTED,
        ),
        (
            "certificate verify failed: certificate has expired (_ssl.c:1006)",
            "certificate verify failed: certificate has expired",
            "Vault's own certificate has expired: renew it on the Vault listener",
        ),
        (
            "certificate verify failed: Hostname mismatch, certificate is not valid for "
            "'127.0.0.1'. (_ssl.c:1006)",
            "certificate verify failed: Hostname mismatch, certificate is not valid for",
            NOT_FOR_ADDR,
        ),
        (
            "certificate verify failed: names do not match (_ssl.c:1006)",
            "certificate verify failed: names do not match",
            NOT_FOR_ADDR,
        ),
        (
            "hostname 'vault.test' doesn't match '127.0.0.1'",
            "certificate verify failed: name mismatch",
            NOT_FOR_ADDR,
        ),
        ("[SSL: WRONG_VERSION_NUMBER] (_ssl.c:1006)", "the server did not speak TLS", NO_TLS),
        ("wrong version number (_ssl.c:1006)", "the server did not speak TLS", NO_TLS),
        (
            "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]",
            "Vault requires a client certificate",
            NEEDS_CERT,
        ),
        ("tlsv13 alert certificate required", "Vault requires a client certificate", NEEDS_CERT),
        ("[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE]", "Vault requires a client certificate", NEEDS_CERT),
        ("sslv3 alert bad certificate", "Vault requires a client certificate", NEEDS_CERT),
        ("EOF occurred in violation of protocol (_ssl.c:2427)", "handshake failed", HANDSHAKE),
        ("the peer went away", "handshake failed", HANDSHAKE),
    ],
)
async def test_tls_failure_without_client_certificate_or_ca(
    text: str, detail: str, hint: str
) -> None:
    error = await failure(transport(), requests.exceptions.SSLError(text))
    assert type(error) is VaultTLSError
    assert str(error) == tls_failed(detail, hint)


def refused(cert: Path) -> str:
    return (
        f"Vault refused the client certificate VAULT_CLIENT_CERT={cert}: it must be signed by "
        "a CA in the listener's tls_client_ca_file, be within its validity and allow client "
        "authentication"
    )


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("[SSL: SSLV3_ALERT_BAD_CERTIFICATE]", "client certificate refused"),
        ("[SSL: TLSV1_ALERT_UNKNOWN_CA]", "client certificate refused"),
        ("EOF occurred in violation of protocol (_ssl.c:2427)", "client certificate refused"),
        ("[SSL: UNEXPECTED_EOF_WHILE_READING]", "client certificate refused"),
        ("sslv3 alert certificate expired", "the client certificate expired"),
        ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]", "Vault requires a client certificate"),
        ("[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE]", "handshake failed"),
    ],
)
async def test_tls_failure_with_a_client_certificate(
    pems: dict[str, Path], text: str, detail: str
) -> None:
    t = transport(VAULT_CLIENT_CERT=str(pems["cert"]), VAULT_CLIENT_KEY=str(pems["key"]))
    hint = {
        "client certificate refused": refused(pems["cert"]),
        "the client certificate expired": (
            f"Vault refused the client certificate VAULT_CLIENT_CERT={pems['cert']} as expired: "
            "renew it (and VAULT_CLIENT_KEY)"
        ),
        "Vault requires a client certificate": NEEDS_CERT,
        "handshake failed": HANDSHAKE,
    }[detail]
    error = await failure(t, requests.exceptions.SSLError(text))
    assert str(error) == tls_failed(detail, hint)


@pytest.mark.parametrize("setting", ["VAULT_CACERT", "VAULT_CAPATH", "VAULT_TLS_SERVER_NAME"])
async def test_tls_hints_name_the_setting_in_use(pems: dict[str, Path], setting: str) -> None:
    value = {
        "VAULT_CACERT": str(pems["ca"]),
        "VAULT_CAPATH": str(pems["capath"]),
        "VAULT_TLS_SERVER_NAME": "vault.reditus.test",
    }[setting]
    t = transport(**{setting: value})
    untrusted = await failure(t, requests.exceptions.SSLError("certificate verify failed: x (y)"))
    mismatch = await failure(t, requests.exceptions.SSLError("hostname 'a' doesn't match 'b'"))
    if setting == "VAULT_TLS_SERVER_NAME":
        assert str(untrusted).endswith(UNTRUSTED)
        assert str(mismatch).endswith(
            "Vault's certificate is not valid for VAULT_TLS_SERVER_NAME=vault.reditus.test: "
            "set it to a name the certificate carries"
        )
    else:
        assert str(untrusted).endswith(
            f"Vault's certificate is not trusted: {setting}={value} does not hold the CA that "
            "signed it"
        )
        assert str(mismatch).endswith(NOT_FOR_ADDR)


# --- TLS settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "verify", "logged"),
    [
        ({}, True, []),
        ({"VAULT_SKIP_VERIFY": "true"}, False, ["VAULT_SKIP_VERIFY is set"]),
        ({"VAULT_SKIP_VERIFY": "true", "VAULT_CACERT": "ca"}, True, []),
        ({"VAULT_SKIP_VERIFY": "true", "VAULT_CAPATH": "capath"}, True, []),
        ({"VAULT_CACERT": "ca"}, True, []),
        ({"VAULT_CAPATH": "capath"}, True, []),
        ({"VAULT_CACERT": "ca", "VAULT_CAPATH": "capath"}, True, ["VAULT_CAPATH is ignored"]),
    ],
)
def test_which_settings_verify_vaults_certificate(
    pems: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, str],
    verify: bool,
    logged: list[str],
) -> None:
    caplog.set_level("INFO", logger="sidecar.sources.vault_client")
    t = transport(**{name: str(pems.get(value, value)) for name, value in settings.items()})
    assert t.verify is verify
    said = [r.getMessage() for r in caplog.records]
    found = [m for m in said if m.startswith(("VAULT_SKIP_VERIFY", "VAULT_CAPATH"))]
    assert len(found) == len(logged)
    assert all(m.startswith(want) for m, want in zip(found, logged, strict=True))


def test_a_client_for_one_call() -> None:
    """The token is explicit ("" when none), the timeout the call's bound or the setting."""
    t = transport()
    assert t.client("s.abc").token == "s.abc"
    assert t.client(None).token == ""
    assert t.client(None).adapter._kwargs["timeout"] == 3
    assert t.client(None, 0.25).adapter._kwargs["timeout"] == 0.25


# --- the bound on a call, the closed transport, an expired client certificate -------------


@pytest.mark.looptime
async def test_a_call_is_given_up_half_a_second_after_its_bound() -> None:
    """On a fast-forwarded loop clock: a call whose worker thread hangs is abandoned at its
    bound plus 0.5 s (the setting's 3 s for `call`), with the timeout error."""
    t = transport()
    loop = asyncio.get_running_loop()
    release = threading.Event()
    try:
        for bound, within in ((1.0, 1.5), (None, 3.5)):
            began = loop.time()
            hung = (
                t.call(lambda client: release.wait(60), token=None)
                if bound is None
                else t.call_within(lambda client: release.wait(60), token=None, bound=bound)
            )
            with pytest.raises(VaultTimeout, match="did not answer within 3s"):
                await hung
            assert loop.time() - began == pytest.approx(within)
    finally:
        release.set()


async def test_a_closed_transport_refuses_calls() -> None:
    t = transport()
    assert await t.call(lambda client: "answered", token=None) == "answered"
    t.close()
    with pytest.raises(SecretUnavailable, match=r"^the Vault session is closed$"):
        await t.call(lambda client: "answered", token=None)


async def test_a_client_certificate_is_expired_from_its_not_after_on(
    pems: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock (injected) reads the certificate's notAfter: expired, no call is made; a
    microsecond before it the call goes ahead."""
    t = transport(VAULT_CLIENT_CERT=str(pems["cert"]), VAULT_CLIENT_KEY=str(pems["key"]))
    assert t.pair is not None
    end = t.pair.not_after

    def clock_at(moment: datetime.datetime) -> None:
        fixed = types.SimpleNamespace(now=lambda tz: moment)
        monkeypatch.setattr(
            vault_client, "datetime", types.SimpleNamespace(datetime=fixed, UTC=datetime.UTC)
        )

    clock_at(end - datetime.timedelta(microseconds=1))
    assert await t.call(lambda client: "answered", token=None) == "answered"
    clock_at(end)
    with pytest.raises(VaultTLSError) as caught:
        await t.call(lambda client: "answered", token=None)
    assert str(caught.value).startswith(
        f"the client certificate VAULT_CLIENT_CERT={pems['cert']} expired at "
        f"{end:%Y-%m-%dT%H:%M:%SZ}"
    )


# --- Retry-After --------------------------------------------------------------------------


def test_retry_after_forms_and_bounds() -> None:
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("") is None
    assert parse_retry_after("-3") is None
    assert parse_retry_after(email.utils.formatdate(time.time() - 3600, usegmt=True)) == 0.0


# --- nothing from the environment but what VaultSettings says ------------------------------


async def test_a_netrc_entry_for_vaults_host_is_not_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests would add `Authorization: Basic` from ~/.netrc (trust_env): our session
    sends only the Vault token."""
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc))
    with answering_http(b'{"data": {"ttl": 0}}', "application/json") as (url, seen):
        t = transport(VAULT_ADDR=url)
        answer = await t.call(lambda client: client.auth.token.lookup_self(), token="s.abc")
    assert answer == {"data": {"ttl": 0}}
    assert [headers.get("Authorization") for headers in seen] == [None]
