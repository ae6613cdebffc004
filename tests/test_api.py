"""The signing API: every status and error code, in the order the README fixes."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from sidecar.api import create_api_app
from sidecar.metrics import Metrics
from sidecar.redact import Redacted
from sidecar.signer import TokenSigner
from sidecar.state import SecretStore, Snapshot

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
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
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


async def test_stale_secret_answers_503(aiohttp_client: Any, registry: CollectorRegistry) -> None:
    clock = [100.0]
    metrics = Metrics(registry, ["default"], "test")
    store = SecretStore(["default"], max_staleness=30, monotonic=lambda: clock[0])
    store.replace("default", Snapshot(TokenSigner("p", Redacted(SECRET)), 1, NOW))
    client = await aiohttp_client(create_api_app(store, metrics, clock=lambda: NOW))
    assert (await client.post("/v1/token", json={"userId": "u"}, headers=HEADERS)).status == 200
    clock[0] += 31
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
