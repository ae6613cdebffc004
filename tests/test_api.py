"""The signing API: every status and error code, in the order the README fixes."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import types
from typing import Any, cast

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

import sidecar.api
from sidecar.api import TOKEN_HANDLER, create_api_app
from sidecar.audit import AuditLog
from sidecar.callers import Caller, CallerPolicy
from sidecar.errors import SourceError
from sidecar.listener import ALLOW_LIST
from sidecar.metrics import Metrics
from sidecar.redact import Redacted
from sidecar.signer import RemoteSigner, TokenSigner
from sidecar.state import SecretStore, Snapshot

from .support import FakeClock, eventually_async

SECRET = "api-test-secret-0123456789abcdef0123456789abcdef0123456789abcdef01234"
NOW = 1795460465.7
HEADERS = {"X-Sidecar-Request": "true", "Content-Type": "application/json"}


def build(
    registry: CollectorRegistry,
    *,
    loaded: bool = True,
    products: tuple[str, ...] = ("default",),
    **kwargs: Any,
) -> web.Application:
    metrics = Metrics(registry, products, "test")
    store = SecretStore(products)
    if loaded:
        for name in products:
            signer = TokenSigner(f"id-{name}", Redacted(SECRET + name))
            store.replace(name, Snapshot(signer=signer, version=3, loaded_at=NOW))
    return create_api_app(store, metrics, clock=lambda: NOW, **kwargs)


@pytest.fixture
async def client(aiohttp_client: Any, registry: CollectorRegistry) -> TestClient:
    return await aiohttp_client(build(registry, products=("default", "shop")))


async def expect_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert SECRET not in json.dumps(body)
    return body


def errors(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("reditus_sidecar_token_errors_total", {"reason": reason})
    assert value is not None
    return value


async def test_signs_a_token(client: TestClient, registry: CollectorRegistry) -> None:
    response = await client.post("/v1/token", json={"userId": "u-123"}, headers=HEADERS)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["productId"] == "id-default"
    assert body["issuedAt"] == int(NOW)
    claims = jwt.decode(body["token"], SECRET + "default", algorithms=["HS512"])
    assert claims == {"ProductId": "id-default", "UserId": "u-123", "iat": int(NOW)}
    issued = {"product": "default"}
    assert registry.get_sample_value("reditus_sidecar_tokens_issued_total", issued) == 1


async def test_picks_the_named_product(client: TestClient, registry: CollectorRegistry) -> None:
    response = await client.post(
        "/v1/token", json={"userId": "u-1", "product": "shop", "extra": [1]}, headers=HEADERS
    )
    assert response.status == 200
    body = await response.json()
    assert body["productId"] == "id-shop"
    jwt.decode(body["token"], SECRET + "shop", algorithms=["HS512"])
    assert (
        registry.get_sample_value("reditus_sidecar_tokens_issued_total", {"product": "shop"}) == 1
    )


async def test_unknown_path_is_404(client: TestClient, registry: CollectorRegistry) -> None:
    for path in ("/", "/v1/tokens", "/metrics", "/v1/token/x"):
        await expect_error(await client.post(path, headers=HEADERS, data=b"{}"), 404, "not_found")
    # unknown path wins over every later check
    await expect_error(await client.get("/nope"), 404, "not_found")
    assert errors(registry, "not_found") == 5


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405(client: TestClient, method: str) -> None:
    response = await client.request(method, "/v1/token", headers=HEADERS, json={"userId": "u"})
    await expect_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


async def test_request_header_is_required(client: TestClient) -> None:
    for value in (None, "false", "1", ""):
        headers = {"Content-Type": "application/json"}
        if value is not None:
            headers["X-Sidecar-Request"] = value
        response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
        await expect_error(response, 403, "missing_request_header")
    headers = {"Content-Type": "application/json", "X-Sidecar-Request": "TRUE"}
    assert (await client.post("/v1/token", json={"userId": "u"}, headers=headers)).status == 200


async def test_header_check_can_be_turned_off(
    aiohttp_client: Any, registry: CollectorRegistry
) -> None:
    client = await aiohttp_client(build(registry, require_header=False))
    response = await client.post("/v1/token", json={"userId": "u"})
    assert response.status == 200


async def test_browser_origin_is_refused(client: TestClient) -> None:
    headers = {**HEADERS, "Origin": "https://evil.example"}
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    await expect_error(response, 403, "browser_origin")
    # the header check comes first
    response = await client.post("/v1/token", json={"userId": "u"}, headers={"Origin": "null"})
    await expect_error(response, 403, "missing_request_header")


async def test_a_repeated_request_header_is_refused(client: TestClient) -> None:
    for values in (["true", "false"], ["true", "true"], ["false", "true"]):
        headers = CIMultiDict([("Content-Type", "application/json")])
        for value in values:
            headers.add("X-Sidecar-Request", value)
        response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
        await expect_error(response, 403, "missing_request_header")


@pytest.mark.parametrize(
    "name", ["Sec-Fetch-Site", "sec-fetch-dest", "Sec-Fetch-User", "SEC-FETCH-SITE"]
)
async def test_sec_fetch_headers_mark_a_browser(client: TestClient, name: str) -> None:
    headers = {**HEADERS, name: "cross-site"}
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    await expect_error(response, 403, "browser_origin")
    # the request header check still comes first
    headers = {"Content-Type": "application/json", name: "cross-site"}
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    await expect_error(response, 403, "missing_request_header")


async def test_node_fetch_with_its_lone_sec_fetch_mode_is_served(client: TestClient) -> None:
    """Node's built-in fetch (undici) sends `Sec-Fetch-Mode: cors` and nothing else of the
    kind; a browser sends Site and Dest with it."""
    headers = {**HEADERS, "Sec-Fetch-Mode": "cors"}
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    assert response.status == 200
    headers["Sec-Fetch-Site"] = "cross-site"
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    await expect_error(response, 403, "browser_origin")


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8787", "127.0.0.1.nip.io", "10.1.2.3:8787", "[::2]:1", "::1"],
)
async def test_a_host_that_is_not_loopback_is_refused(
    client: TestClient, registry: CollectorRegistry, host: str
) -> None:
    headers = {**HEADERS, "Host": host}
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    await expect_error(response, 403, "host_not_allowed")
    assert errors(registry, "host_not_allowed") == 1
    # checked after Origin (4) and before the content type (5)
    response = await client.post(
        "/v1/token", json={"userId": "u"}, headers={**headers, "Origin": "https://e.example"}
    )
    await expect_error(response, 403, "browser_origin")
    response = await client.post(
        "/v1/token", data=b"{}", headers={**headers, "Content-Type": "text/plain"}
    )
    await expect_error(response, 403, "host_not_allowed")


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8787", "localhost", "LocalHost:1", "127.9.9.9", "[::1]:8787", "[::1]"]
)
async def test_loopback_hosts_are_served(client: TestClient, host: str) -> None:
    response = await client.post(
        "/v1/token", json={"userId": "u"}, headers={**HEADERS, "Host": host}
    )
    assert response.status == 200


async def test_the_unix_socket_app_does_not_check_host(
    aiohttp_client: Any, registry: CollectorRegistry
) -> None:
    client = await aiohttp_client(build(registry, check_host=False))
    headers = {**HEADERS, "Host": "%2Frun%2Freditus%2Fsidecar.sock"}
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    assert response.status == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"userId": "a", "userId": "b"}',
        b'{"userId": "a", "product": "default", "product": "shop"}',
        b'{"userId": "a", "extra": {"k": 1, "k": 2}}',
    ],
)
async def test_a_repeated_json_key_is_refused(client: TestClient, body: bytes) -> None:
    response = await client.post("/v1/token", data=body, headers=HEADERS)
    answer = await expect_error(response, 400, "invalid_json")
    assert "repeats the key" in answer["error"]["message"]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/cbor",  # sorts before application/json: refused too, not only those after
        "application/javascript",
        "application/json; charset=latin-1",
        "application/json; charset=us-ascii",
        "application/json; charset=windows-1252",  # a charset sorting after utf-8
    ],
)
async def test_content_type_must_be_json(client: TestClient, content_type: str | None) -> None:
    headers = {"X-Sidecar-Request": "true"}
    if content_type:
        headers["Content-Type"] = content_type
    response = await client.post("/v1/token", data=b'{"userId":"u"}', headers=headers)
    await expect_error(response, 415, "unsupported_media_type")


async def test_json_with_utf8_charset_is_fine(client: TestClient) -> None:
    headers = {**HEADERS, "Content-Type": "application/json; charset=UTF-8"}
    response = await client.post("/v1/token", data=b'{"userId":"u"}', headers=headers)
    assert response.status == 200


async def test_body_over_16_kib_is_413(client: TestClient, registry: CollectorRegistry) -> None:
    big = json.dumps({"userId": "u", "pad": "x" * 16384}).encode()
    await expect_error(await client.post("/v1/token", data=big, headers=HEADERS), 413, "too_large")

    async def chunks() -> Any:  # no Content-Length: the limit holds while reading
        for _ in range(20):
            yield b" " * 1024

    response = await client.post("/v1/token", data=chunks(), headers=HEADERS)
    await expect_error(response, 413, "too_large")
    exactly = b'{"userId":"u"}' + b" " * (16384 - 14)
    assert (await client.post("/v1/token", data=exactly, headers=HEADERS)).status == 200
    assert errors(registry, "too_large") == 2


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1,2]", b'"u"', b"null", b"123", b'{"userId": "u"', b"\xff\xfe{}",
     b'{"userId": NaN}', b"[" * 5000 + b"]" * 5000, b'{"a":' * 2500 + b"1" + b"}" * 2500],
    ids=["empty", "text", "array", "string", "null", "number", "truncated", "not-utf8",
         "nan", "deep-array", "deep-object"],
)  # fmt: skip
async def test_bad_json_is_400(client: TestClient, body: bytes) -> None:
    response = await client.post("/v1/token", data=body, headers=HEADERS)
    await expect_error(response, 400, "invalid_json")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_are_named_in_the_message(client: TestClient, constant: str) -> None:
    body = b'{"userId": "u", "x": %s}' % constant.encode()
    response = await client.post("/v1/token", data=body, headers=HEADERS)
    answer = await expect_error(response, 400, "invalid_json")
    assert answer["error"]["message"] == f"the body contains {constant}, which is not valid JSON"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "required"),
        ({"userId": None}, "required"),
        ({"userId": 123}, "number"),
        ({"userId": 1.5}, "number"),
        ({"userId": True}, "boolean"),
        ({"userId": ["u"]}, "array"),
        ({"userId": {"id": "u"}}, "object"),
        ({"userId": ""}, "empty"),
        ({"userId": "x" * 257}, "longer than 256"),
        ({"userId": "a\nb"}, "control character at position 1"),
        ({"userId": "a\x00"}, "control character"),
        ({"userId": "\x7f"}, "control character"),
        ({"userId": "a\x85b"}, "control character"),
        ({"userId": "u", "product": 7}, "product must be a string"),
    ],
)
async def test_invalid_request_is_400(
    client: TestClient, body: dict[str, Any], needle: str
) -> None:
    response = await client.post("/v1/token", json=body, headers=HEADERS)
    error = await expect_error(response, 400, "invalid_request")
    assert needle in error["error"]["message"]


async def test_lone_surrogate_is_refused(client: TestClient) -> None:
    response = await client.post("/v1/token", data=b'{"userId": "a\\ud800b"}', headers=HEADERS)
    error = await expect_error(response, 400, "invalid_request")
    assert "surrogate" in error["error"]["message"]
    pair = await client.post("/v1/token", data=b'{"userId": "\\ud83d\\ude00"}', headers=HEADERS)
    assert pair.status == 200


async def test_256_code_points_are_accepted(client: TestClient) -> None:
    response = await client.post("/v1/token", json={"userId": "😀" * 256}, headers=HEADERS)
    assert response.status == 200


async def test_unknown_product_is_404(client: TestClient) -> None:
    response = await client.post(
        "/v1/token", json={"userId": "u", "product": "nope"}, headers=HEADERS
    )
    await expect_error(response, 404, "unknown_product")


async def test_503_with_retry_after_before_a_secret_is_loaded(
    aiohttp_client: Any, registry: CollectorRegistry
) -> None:
    client = await aiohttp_client(build(registry, loaded=False, retry_after=lambda _p: 7))
    response = await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    await expect_error(response, 503, "secret_unavailable")
    assert response.headers["Retry-After"] == "7"
    # validation still comes first
    response = await client.post("/v1/token", json={"userId": 5}, headers=HEADERS)
    await expect_error(response, 400, "invalid_request")


async def test_stale_secret_answers_503(
    aiohttp_client: Any, registry: CollectorRegistry, clock: FakeClock
) -> None:
    metrics = Metrics(registry, ["default"], "test")
    store = SecretStore(["default"], max_staleness=30, monotonic=clock)
    store.replace("default", Snapshot(TokenSigner("p", Redacted(SECRET)), 1, NOW))
    client = await aiohttp_client(create_api_app(store, metrics, clock=lambda: NOW))
    assert (await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)).status == 200
    clock.now += 31
    response = await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    await expect_error(response, 503, "secret_unavailable")
    store.confirm("default")
    assert (await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)).status == 200


async def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    response = await client.post(
        "/v1/token", json={"userId": "u"}, headers={**HEADERS, "X-Request-Id": "abc-123"}
    )
    assert response.headers["X-Request-Id"] == "abc-123"
    response = await client.post(
        "/v1/token", json={"userId": "u"}, headers={**HEADERS, "X-Request-Id": "bad id\u00e9"}
    )
    assert response.headers["X-Request-Id"] != "bad id\u00e9"
    assert len(response.headers["X-Request-Id"]) == 16


async def test_latency_is_observed_per_endpoint(
    client: TestClient, registry: CollectorRegistry
) -> None:
    await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    await client.post("/elsewhere", json={"userId": "u"}, headers=HEADERS)
    for endpoint in ("token", "other"):
        count = registry.get_sample_value(
            "reditus_sidecar_request_duration_seconds_count", {"endpoint": endpoint}
        )
        assert count == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"userId": json_values | st.text(max_size=300)},
        optional={"product": json_values | st.sampled_from(["default", "shop"])},
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain"]))
async def test_generated_bodies_never_get_a_5xx(
    client: TestClient, body: bytes, content_type: str
) -> None:
    headers = {"X-Sidecar-Request": "true", "Content-Type": content_type}
    response = await client.post("/v1/token", data=body, headers=headers)
    assert response.status in (200, 400, 404, 415)
    payload = await response.json()
    if response.status == 200:
        assert set(payload) == {"token", "productId", "issuedAt"}
    else:
        assert set(payload["error"]) == {"code", "message"}


# --- boundaries, headers and metrics per outcome --------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("size", "status"), [(16383, 200), (16384, 200), (16385, 413)])
async def test_the_body_limit_is_16_kib_exactly(
    client: TestClient, registry: CollectorRegistry, chunked: bool, size: int, status: int
) -> None:
    body = b'{"userId":"u"}' + b" " * (size - 14)

    async def chunks() -> Any:  # no Content-Length: the limit holds while reading
        yield body[:8000]
        yield body[8000:]

    response = await client.post("/v1/token", data=chunks() if chunked else body, headers=HEADERS)
    if status == 200:
        assert response.status == 200
        assert errors(registry, "too_large") == 0
    else:
        answer = await expect_error(response, 413, "too_large")
        assert answer["error"]["message"] == "the body is larger than 16384 bytes"
        assert errors(registry, "too_large") == 1


async def test_a_content_length_over_the_limit_is_refused_before_the_body_arrives(
    aiohttp_server: Any, registry: CollectorRegistry
) -> None:
    """413 from the header alone: a caller announcing 16385 bytes is not waited for (were
    it, this body that never comes would get 408 after the body timeout)."""
    server = await aiohttp_server(build(registry, body_timeout=1))
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-Sidecar-Request: true\r\nContent-Length: 16385\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert errors(registry, "too_large") == 1


async def test_userid_length_boundary(client: TestClient) -> None:
    response = await client.post("/v1/token", json={"userId": "x" * 256}, headers=HEADERS)
    assert response.status == 200
    response = await client.post("/v1/token", json={"userId": "x" * 257}, headers=HEADERS)
    answer = await expect_error(response, 400, "invalid_request")
    assert answer["error"]["message"] == "userId is longer than 256 characters"


@pytest.mark.parametrize(
    ("escaped", "message"),
    [
        ("a\\ud800", "userId contains a lone surrogate at position 1"),
        ("ab\\udc00", "userId contains a lone surrogate at position 2"),
        ("\\udfff", "userId contains a lone surrogate at position 0"),
        ("\\udbff", "userId contains a lone surrogate at position 0"),
        ("x\\u0000", "userId contains a control character at position 1"),
        ("\\u001f", "userId contains a control character at position 0"),
        ("\\u007f", "userId contains a control character at position 0"),
        ("abc\\u009f", "userId contains a control character at position 3"),
    ],
)
async def test_forbidden_characters_are_named_with_their_position(
    client: TestClient, escaped: str, message: str
) -> None:
    body = b'{"userId": "%s"}' % escaped.encode()
    answer = await expect_error(
        await client.post("/v1/token", data=body, headers=HEADERS), 400, "invalid_request"
    )
    assert answer["error"]["message"] == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"userId": "a", "product": "default", "product": "shop"}',
            "the body repeats the key 'product'; send each key once",
        ),
        (
            b'{"userId": "a", "%s": 1, "%s": 2}' % (b"k" * 100, b"k" * 100),
            f"the body repeats the key {'k' * 64!r}; send each key once",
        ),
    ],
    ids=["second-key", "long-key-cut-at-64"],
)
async def test_the_repeated_key_is_named(client: TestClient, body: bytes, message: str) -> None:
    response = await client.post("/v1/token", data=body, headers=HEADERS)
    answer = await expect_error(response, 400, "invalid_json")
    assert answer["error"]["message"] == message


async def test_an_unknown_product_name_is_cut_at_64_characters(client: TestClient) -> None:
    response = await client.post(
        "/v1/token", json={"userId": "u", "product": "p" * 100}, headers=HEADERS
    )
    answer = await expect_error(response, 404, "unknown_product")
    assert answer["error"]["message"] == f"no product named {'p' * 64!r} is configured"


@pytest.mark.parametrize("value", ["yes", "truex", "false", "1"])
async def test_the_request_header_must_say_true(client: TestClient, value: str) -> None:
    headers = {"Content-Type": "application/json", "X-Sidecar-Request": value}
    response = await client.post("/v1/token", json={"userId": "u"}, headers=headers)
    await expect_error(response, 403, "missing_request_header")


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("POST", "/nope", HEADERS, 404, "not_found"),
        ("GET", "/v1/token", HEADERS, 405, "method_not_allowed"),
        ("POST", "/v1/token", {"Content-Type": "application/json"}, 403, "missing_request_header"),
        ("POST", "/v1/token", {**HEADERS, "Origin": "null"}, 403, "browser_origin"),
        ("POST", "/v1/token", {**HEADERS, "Host": "evil.example"}, 403, "host_not_allowed"),
        ("POST", "/v1/token", {"X-Sidecar-Request": "true"}, 415, "unsupported_media_type"),
    ],
)
async def test_an_error_keeps_the_connection_and_carries_no_store_and_the_request_id(
    client: TestClient,
    registry: CollectorRegistry,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    response = await client.request(
        method, path, data=b'{"userId": "u"}', headers={**headers, "X-Request-Id": "req-7"}
    )
    await expect_error(response, status, code)
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Request-Id"] == "req-7"
    assert "Connection" not in response.headers  # keep-alive: only a stalled body closes
    assert response.headers.get("Allow") == ("POST" if status == 405 else None)
    assert "Retry-After" not in response.headers
    assert errors(registry, code) == 1
    issued = {"product": "default"}
    assert registry.get_sample_value("reditus_sidecar_tokens_issued_total", issued) == 0


async def test_made_request_ids_are_distinct_hex_with_one_prefix(client: TestClient) -> None:
    ids = []
    for path in ("/v1/token", "/v1/token", "/nope", "/v1/token"):
        response = await client.post(path, json={"userId": "u"}, headers=HEADERS)
        ids.append(response.headers["X-Request-Id"])
    assert all(re.fullmatch("[0-9a-f]{16}", made) for made in ids), ids
    assert len(set(ids)) == len(ids)
    assert len({made[:8] for made in ids}) == 1


async def test_a_request_id_of_64_characters_is_kept_65_is_replaced(client: TestClient) -> None:
    sane = "a" * 63 + "."
    response = await client.post(
        "/v1/token", json={"userId": "u"}, headers={**HEADERS, "X-Request-Id": sane}
    )
    assert response.headers["X-Request-Id"] == sane
    response = await client.post(
        "/v1/token", json={"userId": "u"}, headers={**HEADERS, "X-Request-Id": sane + "b"}
    )
    assert re.fullmatch("[0-9a-f]{16}", response.headers["X-Request-Id"])


async def test_a_bug_answers_500_internal_and_is_counted(
    aiohttp_client: Any, registry: CollectorRegistry
) -> None:
    def broken_clock() -> float:
        raise RuntimeError("a bug")

    app = build(registry)
    app[TOKEN_HANDLER].clock = broken_clock
    client = await aiohttp_client(app)
    response = await client.post(
        "/v1/token", json={"userId": "u"}, headers={**HEADERS, "X-Request-Id": "bug-1"}
    )
    answer = await expect_error(response, 500, "internal")
    assert answer["error"]["message"] == "internal error; see the sidecar's log"
    assert response.headers["X-Request-Id"] == "bug-1"
    assert response.headers["Cache-Control"] == "no-store"
    assert errors(registry, "internal") == 1
    assert app[TOKEN_HANDLER].in_flight == 0


async def test_latency_is_the_time_inside_the_handler(
    client: TestClient, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = itertools.count()
    fake_time = types.SimpleNamespace(perf_counter=lambda: 10.0 + 0.25 * next(ticks))
    monkeypatch.setattr(sidecar.api, "time", fake_time)
    assert (await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)).status == 200
    token = {"endpoint": "token"}
    assert registry.get_sample_value("reditus_sidecar_request_duration_seconds_sum", token) == 0.25
    le = {**token, "le": "0.25"}
    assert registry.get_sample_value("reditus_sidecar_request_duration_seconds_bucket", le) == 1
    le = {**token, "le": "0.1"}
    assert registry.get_sample_value("reditus_sidecar_request_duration_seconds_bucket", le) == 0


async def test_in_flight_counts_a_request_while_its_body_arrives(
    aiohttp_client: Any, registry: CollectorRegistry
) -> None:
    app = build(registry)
    handler = app[TOKEN_HANDLER]
    client = await aiohttp_client(app)
    assert handler.in_flight == 0
    go_on = asyncio.Event()

    async def slow_body() -> Any:
        yield b'{"userId": '
        await go_on.wait()
        yield b'"u"}'

    sending = asyncio.ensure_future(client.post("/v1/token", data=slow_body(), headers=HEADERS))
    await eventually_async(lambda: handler.in_flight, what="the request in the handler")
    assert handler.in_flight == 1
    go_on.set()
    assert (await sending).status == 200
    assert handler.in_flight == 0
    await expect_error(await client.get("/v1/token"), 405, "method_not_allowed")
    assert handler.in_flight == 0


@pytest.mark.looptime
async def test_a_stalled_body_gets_408_after_5_s_and_the_connection_closes(
    client: TestClient, registry: CollectorRegistry
) -> None:
    """On a fast-forwarded loop clock: the default body timeout is 5 s."""
    never = asyncio.Event()

    async def stalled() -> Any:
        yield b'{"userId": '
        await never.wait()
        yield b"}"

    loop = asyncio.get_running_loop()
    began = loop.time()
    response = await client.post("/v1/token", data=stalled(), headers=HEADERS)
    answer = await expect_error(response, 408, "request_timeout")
    assert 5.0 <= loop.time() - began < 5.1
    assert answer["error"]["message"] == "the body did not arrive within 5 s"
    assert response.headers["Connection"] == "close"
    assert response.headers["Cache-Control"] == "no-store"
    assert errors(registry, "request_timeout") == 1


async def test_retry_after_defaults_to_1_s(
    aiohttp_client: Any, registry: CollectorRegistry
) -> None:
    client = await aiohttp_client(build(registry, loaded=False))
    response = await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    await expect_error(response, 503, "secret_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert errors(registry, "secret_unavailable") == 1


async def test_token_issued_is_logged_at_debug_only(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.api")
    await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    assert [r for r in caplog.records if r.getMessage() == "token issued"] == []
    caplog.set_level(logging.DEBUG, logger="sidecar.api")
    await client.post("/v1/token", json={"userId": "u"}, headers={**HEADERS, "X-Request-Id": "r9"})
    (issued,) = [r for r in caplog.records if r.getMessage() == "token issued"]
    assert (issued.request_id, issued.product, issued.version) == ("r9", "default", 3)  # type: ignore[attr-defined]


# --- allow-list, audit and transit mode, in process ---------------------------------------


class _Audit:
    """Stands in for AuditLog: keeps what was submitted, answers with `result`."""

    def __init__(self, result: bool | None) -> None:
        self.result = result
        self.records: list[dict[str, Any]] = []

    def submit(self, **record: Any) -> asyncio.Future[bool] | None:
        self.records.append(record)
        if self.result is None:  # failing open: nothing to wait for
            return None
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(self.result)
        return done

    async def recorded(self, pending: asyncio.Future[bool]) -> bool:
        return await pending


@pytest.mark.parametrize("check_host", [True, False], ids=["tcp", "unix"])
@pytest.mark.parametrize("result", [None, True], ids=["open", "closed-written"])
async def test_the_audit_gets_the_record_of_each_token(
    aiohttp_client: Any, registry: CollectorRegistry, check_host: bool, result: bool | None
) -> None:
    audit = _Audit(result)
    client = await aiohttp_client(
        build(registry, check_host=check_host, audit=cast(AuditLog, audit))
    )
    response = await client.post(
        "/v1/token", json={"userId": "u-9"}, headers={**HEADERS, "X-Request-Id": "a-1"}
    )
    assert response.status == 200
    assert audit.records == [
        {
            "request_id": "a-1",
            "product": "default",
            "product_id": "id-default",
            "version": 3,
            "issued_at": int(NOW),
            # no kernel credentials in process: TCP says so, a unix peer is "unknown"
            "caller": "tcp" if check_host else "unknown",
            "user_id": "u-9",
        }
    ]


async def test_an_unwritten_audit_record_withholds_the_token(
    aiohttp_client: Any, registry: CollectorRegistry
) -> None:
    audit = _Audit(False)
    client = await aiohttp_client(build(registry, audit=cast(AuditLog, audit)))
    response = await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    answer = await expect_error(response, 503, "audit_unavailable")
    assert "token" not in answer
    assert response.headers["Retry-After"] == "1"
    assert len(audit.records) == 1
    assert errors(registry, "audit_unavailable") == 1
    issued = {"product": "default"}
    assert registry.get_sample_value("reditus_sidecar_tokens_issued_total", issued) == 0


@pytest.mark.parametrize(
    ("caller", "status", "message"),
    [
        (None, 403, "the kernel could not identify this caller and an allow-list is set"),
        (Caller(uid=9, gid=None, pid=None), 403, "uid 9 is not allowed to sign"),
        (Caller(uid=9, gid=10, pid=55), 403, "uid 9 and gid 10 are not allowed to sign"),
        (Caller(uid=7, gid=None, pid=None), 200, None),
        (Caller(uid=9, gid=8, pid=55), 200, None),
    ],
)
async def test_the_allow_list_names_the_refused_caller(
    aiohttp_client: Any,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caller: Caller | None,
    status: int,
    message: str | None,
) -> None:
    monkeypatch.setattr(sidecar.api, "caller_of", lambda _request: caller)
    audit = _Audit(None)
    policy = CallerPolicy(frozenset({7}), frozenset({8}))
    client = await aiohttp_client(build(registry, callers=policy, audit=cast(AuditLog, audit)))
    response = await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    if status == 200:
        assert response.status == 200
        assert [record["caller"] for record in audit.records] == [caller]
        assert errors(registry, "caller_not_allowed") == 0
    else:
        answer = await expect_error(response, 403, "caller_not_allowed")
        assert answer["error"]["message"] == message
        assert errors(registry, "caller_not_allowed") == 1
        # order 2a: after the method, before the request header
        await expect_error(await client.get("/v1/token"), 405, "method_not_allowed")
        response = await client.post("/v1/token", json={"userId": "u"})
        await expect_error(response, 403, "caller_not_allowed")


def test_the_app_hands_its_allow_list_to_its_listener(registry: CollectorRegistry) -> None:
    """The listener keeps allowed callers' connections over others' (sidecar/listener.py)."""
    policy = CallerPolicy(frozenset({7}), frozenset({8}))
    assert build(registry, callers=policy)[ALLOW_LIST] is policy
    assert ALLOW_LIST not in build(CollectorRegistry())


class _Transit(RemoteSigner):
    """A remote signer answering with a fixed token, or failing like Vault can."""

    def __init__(self, error: SourceError | None = None) -> None:
        super().__init__("id-transit")
        self.error = error

    async def sign_remote(self, user_id: str, iat: int) -> tuple[str, int]:
        if self.error is not None:
            raise self.error
        return f"remote.{user_id}.{iat}", 12


def _transit_app(registry: CollectorRegistry, signer: _Transit) -> web.Application:
    metrics = Metrics(registry, ["default"], "test")
    store = SecretStore(["default"])
    store.replace("default", Snapshot(signer=signer, version=1, loaded_at=NOW))
    return create_api_app(store, metrics, clock=lambda: NOW)


async def test_transit_mode_answers_with_the_remote_token(
    aiohttp_client: Any, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar.api")
    client = await aiohttp_client(_transit_app(registry, _Transit()))
    response = await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    assert response.status == 200
    assert await response.json() == {
        "token": f"remote.u.{int(NOW)}",
        "productId": "id-transit",
        "issuedAt": int(NOW),
    }
    (issued,) = [r for r in caplog.records if r.getMessage() == "token issued"]
    assert issued.version == 12  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(None, "1"), (0.0, "1"), (0.2, "1"), (2.5, "3"), (7.0, "7"), (-3.0, "1")],
)
async def test_transit_failure_is_503_with_a_whole_retry_after_of_at_least_1(
    aiohttp_client: Any, registry: CollectorRegistry, retry_after: float | None, header: str
) -> None:
    signer = _Transit(SourceError("Vault is sealed", retry_after=retry_after))
    client = await aiohttp_client(_transit_app(registry, signer))
    response = await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)
    answer = await expect_error(response, 503, "secret_unavailable")
    assert "Vault is sealed" not in answer["error"]["message"]
    assert response.headers["Retry-After"] == header
    assert errors(registry, "secret_unavailable") == 1
