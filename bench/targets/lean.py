"""The lean reference: a hand-written aiohttp handler doing the sidecar's essential work per
token and nothing more: the request-header and browser checks, strict JSON (a repeated key
refused), the userId rules, HS512 with the standard library, and two metric updates (the
issued counter and the latency histogram). What the sidecar's request path is held to.

    python bench/targets/lean.py PORT [asyncio|uvloop]
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import sys
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from serving import serve  # bench/targets/, beside this script

SECRET = b"bench-secret-0123456789abcdef-0123456789abcdef"
PRODUCT_ID = "prod-bench"
MAX_BODY = 16 * 1024
HEADER = base64.urlsafe_b64encode(b'{"alg":"HS512","typ":"JWT"}').rstrip(b"=")

registry = CollectorRegistry()
ISSUED = Counter("lean_tokens_issued", "", ["product"], registry=registry).labels("default")
LATENCY = Histogram("lean_request_duration_seconds", "", ["endpoint"], registry=registry).labels(
    "token"
)
MAC = hmac.new(SECRET, digestmod=hashlib.sha512)


def refuse(status: int, code: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": code}}, status=status)


def no_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("repeated key")
    return result


# control characters (Cc: C0, DEL, C1) and lone surrogates
FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def valid_user_id(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 256 and not FORBIDDEN.search(value)


async def handle(request: web.Request) -> web.Response:
    started = time.perf_counter()
    headers = request.headers
    if headers.get("X-Sidecar-Request", "").lower() != "true":
        return refuse(403, "missing_request_header")
    if "Origin" in headers:
        return refuse(403, "browser_origin")
    if request.content_type != "application/json":
        return refuse(415, "unsupported_media_type")
    if (request.content_length or 0) > MAX_BODY:
        return refuse(413, "too_large")
    try:
        body = json.loads(await request.read(), object_pairs_hook=no_repeats)
    except ValueError:
        return refuse(400, "invalid_json")
    if not isinstance(body, dict) or not valid_user_id(body.get("userId")):
        return refuse(400, "invalid_request")
    iat = int(time.time())
    payload = json.dumps(
        {"ProductId": PRODUCT_ID, "UserId": body["userId"], "iat": iat},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    signing_input = HEADER + b"." + base64.urlsafe_b64encode(payload).rstrip(b"=")
    mac = MAC.copy()
    mac.update(signing_input)
    token = signing_input + b"." + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=")
    ISSUED.inc()
    LATENCY.observe(time.perf_counter() - started)
    answer = {"token": token.decode(), "productId": PRODUCT_ID, "issuedAt": iat}
    return web.Response(body=json.dumps(answer).encode(), content_type="application/json")


if __name__ == "__main__":
    serve(handle, int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "uvloop")
