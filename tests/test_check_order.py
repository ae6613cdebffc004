"""The signing checks' order is a contract: README "Signing API" (the order column) and
docs/openapi.yaml state it, `TokenHandler.checks` holds it, and `_sign` runs it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

import sidecar.api
from sidecar.api import MAX_BODY, TOKEN_HANDLER, TokenHandler, create_api_app
from sidecar.audit import AuditLog
from sidecar.callers import Caller, CallerPolicy
from sidecar.metrics import Metrics
from sidecar.redact import Redacted
from sidecar.signer import TokenSigner
from sidecar.state import SecretStore, Snapshot

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OPENAPI = ROOT / "docs" / "openapi.yaml"
NOW = 1795460465.0
ALLOWED = Caller(uid=7, gid=None, pid=None)
UNLISTED = Caller(uid=9, gid=None, pid=None)

# What each option turns off when it is not set; every other check runs in every configuration.
OPTIONS: dict[str, tuple[dict[str, Any], set[str]]] = {
    "no allow-list": ({"callers": None}, {"caller_not_allowed"}),
    "no request header": ({"require_header": False}, {"missing_request_header"}),
    "unix socket (no Host check)": ({"check_host": False}, {"host_not_allowed"}),
    "no audit": ({"audit": None}, {"audit_unavailable"}),
}


def readme_table() -> list[tuple[str, int, str]]:
    """(order, status, code) per row of the README's error table, in its order."""
    text = README.read_text()
    start = text.index("They are checked in this order")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        row = re.match(r"^\| (\w+) \| (\d{3}) \| `(\w+)` \|", line)
        if row:
            rows.append((row[1], int(row[2]), row[3]))
    return rows


def openapi_order() -> list[str]:
    """The codes in the description's "Checks run in a fixed order" paragraph, in order."""
    description = yaml.safe_load(OPENAPI.read_text())["info"]["description"]
    paragraph = next(p for p in description.split("\n\n") if p.startswith("Checks run in"))
    return re.findall(r"`(\w+)`", paragraph)


class _Audit:
    """Stands in for AuditLog, failing closed: `written` says whether a record gets written."""

    def __init__(self) -> None:
        self.written = False

    def submit(self, **_record: Any) -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(self.written)
        return done

    async def recorded(self, pending: asyncio.Future[bool]) -> bool:
        return await pending


def full_options(audit: _Audit | None = None) -> dict[str, Any]:
    """Every option that adds a check, on."""
    return {
        "callers": CallerPolicy(frozenset({ALLOWED.uid}), frozenset()),
        "require_header": True,
        "check_host": True,
        "audit": cast(AuditLog, audit or _Audit()),
    }


def handler(registry: CollectorRegistry, **options: Any) -> TokenHandler:
    products = ("default", "cold")
    store = SecretStore(products)
    signer = TokenSigner("id-default", Redacted("s" * 64))
    store.replace("default", Snapshot(signer=signer, version=1, loaded_at=NOW))
    metrics = Metrics(registry, products, "test")
    return TokenHandler(store, metrics, clock=lambda: NOW, body_timeout=0.2, **options)


def listed(h: TokenHandler) -> list[tuple[str, str]]:
    return [(check.order, check.code) for check in h.checks]


def test_the_readme_and_the_openapi_description_state_one_order() -> None:
    table = readme_table()
    assert len(table) >= 14, table  # the parser found the table
    assert [code for _, _, code in table] == openapi_order()


def test_the_full_pipeline_is_the_documented_order(registry: CollectorRegistry) -> None:
    full = handler(registry, **full_options())
    assert listed(full) == [(order, code) for order, _, code in readme_table()]
    assert [check.code for check in full.checks] == openapi_order()


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_turns_off_exactly_its_checks(registry: CollectorRegistry, option: str) -> None:
    change, turned_off = OPTIONS[option]
    full = listed(handler(registry, **full_options()))
    fewer = listed(handler(CollectorRegistry(), **{**full_options(), **change}))
    assert fewer == [(order, code) for order, code in full if code not in turned_off]


def test_the_defaults_run_the_pipeline_without_allow_list_and_audit(
    registry: CollectorRegistry,
) -> None:
    full = listed(handler(CollectorRegistry(), **full_options()))
    off = OPTIONS["no allow-list"][1] | OPTIONS["no audit"][1]
    assert listed(handler(registry)) == [(o, c) for o, c in full if c not in off]


def test_the_head_loop_and_the_record_loop_run_the_listed_checks(
    registry: CollectorRegistry,
) -> None:
    """`_sign` loops over these tuples: the bound methods of the listed checks, nothing else."""
    h = handler(registry, **full_options())
    assert h._head == tuple(check.run for check in h.head_checks)
    assert h._record == tuple(check.run for check in h.record_checks)
    assert h.checks == h.head_checks + h.body_checks + h.record_checks


async def _stalled() -> AsyncIterator[bytes]:
    yield b'{"userId": '
    await asyncio.Event().wait()


# A request failing every check at once, and how to mend each failure in turn: the body
# failures nest (a stalled body that came would be bad JSON, naming an unknown product...).
FIXES: dict[str, Callable[[dict[str, Any]], None]] = {
    "not_found": lambda r: r.update(path="/v1/token"),
    "method_not_allowed": lambda r: r.update(method="POST"),
    "caller_not_allowed": lambda r: r.update(caller=ALLOWED),
    "missing_request_header": lambda r: r["headers"].update({"X-Sidecar-Request": "true"}),
    "browser_origin": lambda r: r["headers"].pop("Origin"),
    "host_not_allowed": lambda r: r["headers"].update(Host="localhost:8787"),
    "unsupported_media_type": lambda r: r["headers"].update({"Content-Type": "application/json"}),
    "too_large": lambda r: r.update(body=_stalled),
    "request_timeout": lambda r: r.update(body=lambda: b'{"userId": 5, "product": "nope"'),
    "invalid_json": lambda r: r.update(body=lambda: b'{"userId": 5, "product": "nope"}'),
    "invalid_request": lambda r: r.update(body=lambda: b'{"userId": "u", "product": "nope"}'),
    "unknown_product": lambda r: r.update(body=lambda: b'{"userId": "u", "product": "cold"}'),
    "secret_unavailable": lambda r: r.update(body=lambda: b'{"userId": "u"}'),
    "audit_unavailable": lambda r: r["audit"].__setattr__("written", True),
}


@pytest.mark.parametrize("option", ["all on", *OPTIONS])
async def test_the_checks_answer_in_the_listed_order(
    aiohttp_client: Any,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    option: str,
) -> None:
    """Peeling a request that fails every check: each answer is the next listed check's,
    with the README's status, and a check the configuration leaves out never answers."""
    audit = _Audit()
    change = OPTIONS[option][0] if option in OPTIONS else {}
    h = handler(registry, **{**full_options(audit), **change})
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", h.handle)
    request: dict[str, Any] = {
        "path": "/v1/nope",
        "method": "PUT",
        "caller": UNLISTED,
        "headers": {
            "Origin": "https://evil.example",
            "Host": "evil.example",
            "Content-Type": "text/plain",
        },
        "body": lambda: b"{" + b" " * MAX_BODY,
        "audit": audit,
    }
    monkeypatch.setattr(sidecar.api, "caller_of", lambda _request: request["caller"])
    status = {code: status for _, status, code in readme_table()}
    client = await aiohttp_client(app)
    for check in h.checks:
        response = await client.request(
            request["method"], request["path"], headers=request["headers"], data=request["body"]()
        )
        answer = await response.json()
        assert (response.status, answer["error"]["code"]) == (status[check.code], check.code)
        FIXES[check.code](request)
    response = await client.request(
        request["method"], request["path"], headers=request["headers"], data=request["body"]()
    )
    assert response.status == 200, await response.text()


def test_create_api_app_builds_one_pipeline_for_its_configuration(
    registry: CollectorRegistry,
) -> None:
    store = SecretStore(("default",))
    metrics = Metrics(registry, ("default",), "test")
    app = create_api_app(store, metrics, check_host=False, require_header=False)
    off = {"caller_not_allowed", "missing_request_header", "host_not_allowed", "audit_unavailable"}
    full = listed(handler(CollectorRegistry(), **full_options()))
    assert listed(app[TOKEN_HANDLER]) == [(o, c) for o, c in full if c not in off]
