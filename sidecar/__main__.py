"""Command line: `reditus-sidecar serve | demo | sign | check` (also `python -m sidecar`).

Exit codes: 0 success, 1 runtime failure (secret unreadable, cannot listen),
2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from . import __version__, logs
from .config import GLOBAL_KEYS, Settings, load_settings, parse_address
from .errors import ConfigError, SourceError
from .signer import TokenSigner

log = logging.getLogger("sidecar")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
T = TypeVar("T")


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run on uvloop when it is installed (the `speed` extra), else plain asyncio."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def _settings(args: argparse.Namespace, *, one_shot: bool = False) -> Settings:
    """Load settings and set up logging; one-shot commands print their own result, so their
    logs stay at warning level unless debug is asked for."""
    settings = load_settings(config_file=args.config)
    level = settings.log_level
    if one_shot and level == "info":
        level = "warning"
    logs.configure(level, settings.log_format)
    if one_shot and level != "debug":
        # The Vault session's "login failed, retry in N s" would promise a retry that a
        # one-shot command never makes; the command prints the failure itself. A token it
        # could not revoke at the end is still a warning (sidecar.sources.vault.revoke).
        logging.getLogger("sidecar.sources.vault").setLevel(logging.ERROR)
        logging.getLogger("sidecar.sources.vault.revoke").setLevel(level.upper())
    if one_shot and settings.vault.revoke_on_shutdown == "all":
        # `all` hands serve's token to the sidecar to end; a one-shot command run next to
        # serve (kubectl exec) shares a handed token with it and must not end it under it.
        # The token it logged in for itself it still revokes.
        vault = dataclasses.replace(settings.vault, revoke_on_shutdown="true")
        settings = dataclasses.replace(settings, vault=vault)
    if settings.unknown_env:
        log.warning(
            "ignoring unknown variables (typo?)", extra={"detail": ", ".join(settings.unknown_env)}
        )
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    settings = _settings(args)
    return _run(lambda: serve(settings))


async def _read_all(settings: Settings) -> dict[str, Any]:
    """Fetch every product once; a product maps to its material or its error. The Vault
    token it logged in for is revoked at the end (REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN):
    each run would otherwise leave one live token behind, for its whole TTL."""
    from prometheus_client import CollectorRegistry

    from .metrics import Metrics
    from .sources.factory import build_sources

    # A one-shot command exports no metrics: they go to a registry of their own.
    names = [product.name for product in settings.products]
    sources = build_sources(settings, Metrics(CollectorRegistry(), names, __version__))
    results: dict[str, Any] = {}
    await sources.start()
    try:
        for name, source in sources.sources.items():
            try:
                results[name] = await source.fetch()
            except SourceError as exc:
                results[name] = exc
    finally:
        await sources.close(revoke=True)
    return results


def _transit_once(settings: Settings, user_id: str | None, command: str) -> int:
    """`check`/`sign` in transit mode: one HMAC from Vault (the secret is never read)."""
    from .transit import sign_once

    try:
        token, version = _run(lambda: sign_once(settings, user_id, int(time.time())))
    except SourceError as exc:
        print(f"{command}: product default: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if user_id is not None:
        print(token)
    else:
        assert settings.transit is not None
        print(
            f"check: product default: ok (product id {settings.transit.product_id!r}, "
            f"transit key version {version})"
        )
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(args, one_shot=True)
    if settings.transit is not None:
        return _transit_once(settings, None, "check")
    results = _run(lambda: _read_all(settings))
    failed = False
    for name, result in results.items():
        if isinstance(result, SourceError):
            failed = True
            print(f"check: product {name}: FAILED: {result}", file=sys.stderr)
        else:
            print(
                f"check: product {name}: ok (product id {result.product_id!r}, "
                f"version {result.version})"
            )
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from .token_request import ApiError, validate_user_id

    settings = _settings(args, one_shot=True)
    try:
        user_id = validate_user_id(args.user_id)
    except ApiError as exc:
        print(f"sign: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if settings.product(args.product) is None:
        print(f"sign: no product named {args.product!r} is configured", file=sys.stderr)
        return EXIT_CONFIG
    if settings.transit is not None:
        return _transit_once(settings, user_id, "sign")
    results = _run(lambda: _read_all(settings))
    result = results[args.product]
    if isinstance(result, SourceError):
        print(f"sign: product {args.product}: {result}", file=sys.stderr)
        return EXIT_FAILURE
    signer = TokenSigner(result.product_id, result.secret, ttl=settings.token_ttl)
    print(signer.sign(user_id, int(time.time())))
    return EXIT_OK


def _no_op(_args: argparse.Namespace) -> int:
    return EXIT_OK


READY_TIMEOUT = 2.0  # a probe that waits longer than this is a failed probe


def cmd_ready(args: argparse.Namespace) -> int:
    """Exit 0 when `/readyz` answers 200 within READY_TIMEOUT, else 1: the health check of
    an image or a compose service, which have no curl. Reads only the ops address, so it
    works whatever else the environment holds."""
    url = args.url or ops_url(os.environ.get("REDITUS_SIDECAR_METRICS_LISTEN", ""))
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=READY_TIMEOUT) as answer:  # noqa: S310 - an operator's URL
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"ready: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return EXIT_FAILURE
    if status != 200:
        print(f"ready: {url}/readyz answered {status}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def ops_url(listen: str) -> str:
    """The ops listener's URL from REDITUS_SIDECAR_METRICS_LISTEN; a wildcard address is
    reached on loopback."""
    default = GLOBAL_KEYS["METRICS_LISTEN"] or ""
    address = parse_address(
        listen or default, "REDITUS_SIDECAR_METRICS_LISTEN", loopback_only=False
    )
    host = address.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="reditus-sidecar",
        description="Signs Reditus widget tokens on loopback with a product secret from Vault.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if name != "demo":
            sub.add_argument(
                "--config", metavar="FILE", help="TOML config file (environment variables win)"
            )
        return sub

    add("serve", "run the sidecar from the environment (and --config)", cmd_serve)
    # Listed for --help only: main() hands `demo ...` to sidecar.demo before parsing.
    add("demo", "run against a throwaway OpenBao dev server on loopback (demo --help)", _no_op)
    sign = add("sign", "print one token with the configured secret", cmd_sign)
    sign.add_argument("--user-id", required=True, help="the Reditus UserId claim")
    sign.add_argument("--product", default="default", help="configured product name")
    add("check", "validate configuration and read every product's secret once", cmd_check)
    ready = commands.add_parser(
        "ready",
        help="exit 0 when /readyz answers 200 within 2 s, else 1 (a health check)",
        description="exit 0 when /readyz answers 200 within 2 s, else 1 (a health check)",
    )
    ready.set_defaults(handler=cmd_ready)
    ready.add_argument(
        "--url",
        help="the ops listener (default: from REDITUS_SIDECAR_METRICS_LISTEN, a wildcard "
        "address read as loopback)",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the demo parses its own options (argparse REMAINDER would not)
        from .demo import main as demo_main

        return demo_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"reditus-sidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
