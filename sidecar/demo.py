"""`reditus-sidecar demo`: the sidecar against a throwaway OpenBao dev server, in one command.

It seeds a random demo secret, sets up the least-privilege policy and an AppRole the way
deploy/vault/ does it in production, runs the real sidecar (AppRole auth) in-process and
prints a ready `curl` line and how to rotate the secret. Ctrl-C or SIGTERM stops the
sidecar, then OpenBao (by PID), and removes the temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import urllib.request
from pathlib import Path
from types import FrameType

import hvac

from . import logs
from .config import Address, load_settings, parse_address
from .devserver import BaoNotFound, OpenBaoDevServer, find_bao
from .errors import ConfigError
from .timing import JITTER

POLICY_NAME = "reditus-sidecar"
ROLE_NAME = "reditus-sidecar"
KV_MOUNT, KV_PATH = "secret", "reditus"
# Token lifetimes of the demo role (durations, not credentials); secret ids never expire.
ROLE_TTLS = {"token_ttl": "20m", "token_max_ttl": "1h", "secret_id_ttl": "0"}

# Identical to deploy/vault/reditus-sidecar.hcl (a test keeps them equal).
POLICY_HCL = """\
# reditus-sidecar: read the product secret, and nothing else.
#
# A KV v2 read of the data path returns the latest version together with its metadata
# (version number, deletion and destruction state), which is all the sidecar needs to
# follow rotations: no access to secret/metadata/ is required.
# Looking up and renewing its own token (auth/token/lookup-self, renew-self) is granted
# by Vault's built-in `default` policy, which tokens carry unless a role disables it.
# setup-approle.sh and setup-kubernetes-auth.sh rewrite the path below for another
# KV_MOUNT / KV_PATH.
path "secret/data/reditus" {
  capabilities = ["read"]
}
"""


def policy_for(mount: str = KV_MOUNT, path: str = KV_PATH) -> str:
    """The least-privilege policy for one KV v2 secret (what the setup scripts render)."""
    return POLICY_HCL.replace('"secret/data/reditus"', f'"{mount}/data/{path}"')


def say(message: str = "") -> None:
    print(f"[demo] {message}" if message else "", flush=True)


class _Interrupted(Exception):
    """SIGTERM during the set-up phase, before the sidecar handles signals itself."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted


def seed(bao: OpenBaoDevServer, workdir: Path) -> tuple[str, Path, str]:
    """Secret, policy, AppRole: returns the product id, the secret-id file, the role id."""
    root = hvac.Client(url=bao.addr, token=bao.root_token, cert=(), verify=True, timeout=10)
    product_id = "demo-product-" + secrets.token_hex(4)
    root.secrets.kv.v2.create_or_update_secret(
        path=KV_PATH,
        mount_point=KV_MOUNT,
        secret={"product_id": product_id, "product_secret": secrets.token_hex(32)},
    )
    say(f"seeded a random product secret at {KV_MOUNT}/{KV_PATH} (product id {product_id})")
    root.sys.create_or_update_acl_policy(name=POLICY_NAME, policy=policy_for())
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(
        role_name=ROLE_NAME,
        token_policies=[POLICY_NAME],
        **ROLE_TTLS,
    )
    role_id = root.auth.approle.read_role_id(ROLE_NAME)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(ROLE_NAME)["data"]["secret_id"]
    secret_id_file = workdir / "secret-id"
    fd = os.open(secret_id_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret_id)
    say(
        f"policy {POLICY_NAME!r} (read on {KV_MOUNT}/data/{KV_PATH} only) and AppRole role "
        f"{ROLE_NAME!r}; secret id in {secret_id_file} (mode 0600)"
    )
    return product_id, secret_id_file, role_id


def _ready(metrics_url: str) -> bool:
    try:
        with urllib.request.urlopen(metrics_url + "/readyz", timeout=1) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False


async def run_sidecar(env: dict[str, str], banner: list[str], metrics_url: str) -> int:
    """Run the sidecar until SIGINT/SIGTERM; print the banner once it is ready."""
    from .server import serve

    settings = load_settings(env)
    logs.configure(settings.log_level, settings.log_format)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(serve(settings, stop=stop))
    while not task.done():
        if await asyncio.to_thread(_ready, metrics_url):
            for line in banner:
                print(line, flush=True)
            break
        await asyncio.sleep(0.1)
    return await task


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="reditus-sidecar demo",
        description="Run the sidecar against a throwaway OpenBao dev server on loopback.",
    )
    parser.add_argument("--listen", default="127.0.0.1:8787", help="signing listener")
    parser.add_argument(
        "--metrics-listen", default="127.0.0.1:9102", help="metrics and health listener"
    )
    parser.add_argument(
        "--bao-port", type=int, default=0, help="OpenBao dev server port (default: a free one)"
    )
    parser.add_argument(
        "--refresh-interval", type=float, default=5.0, help="seconds between secret reads"
    )
    if argv[:1] == ["--"]:  # `reditus-sidecar demo -- --listen ...`
        argv = argv[1:]
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        listen = parse_address(args.listen, "--listen", loopback_only=True)
        metrics = parse_address(args.metrics_listen, "--metrics-listen", loopback_only=False)
        bao_path = find_bao()
    except (ConfigError, BaoNotFound) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    workdir = Path(tempfile.mkdtemp(prefix="reditus-demo-"))
    bao = OpenBaoDevServer(bao=bao_path, port=args.bao_port or None, workdir=workdir / "openbao")
    bao.workdir.mkdir()
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        say(f"working directory {workdir}")
        say(f"starting an OpenBao dev server ({bao_path}) ...")
        bao.start()
        say(f"OpenBao dev server at {bao.addr} (pid {bao.pid}, in memory)")
        product_id, secret_id_file, role_id = seed(bao, workdir)
        env = {
            "VAULT_ADDR": bao.addr,
            "REDITUS_SIDECAR_VAULT_AUTH": "approle",
            "REDITUS_SIDECAR_VAULT_ROLE_ID": role_id,
            "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": str(secret_id_file),
            "REDITUS_SIDECAR_LISTEN": str(listen),
            "REDITUS_SIDECAR_METRICS_LISTEN": str(metrics),
            "REDITUS_SIDECAR_REFRESH_INTERVAL": f"{args.refresh_interval:g}",
            "REDITUS_SIDECAR_BACKOFF_MAX": "5",
            "REDITUS_SIDECAR_LOG_FORMAT": "text",
        }
        say("starting the sidecar (AppRole auth) ...")
        lines = banner(listen, metrics, args.refresh_interval, bao, product_id)
        code = asyncio.run(run_sidecar(env, lines, f"http://{metrics}"))
        if code != 0:
            say(f"the sidecar stopped with exit code {code} (port taken? see --listen)")
        return code
    except (KeyboardInterrupt, _Interrupted):
        return 0
    except hvac.exceptions.VaultError as exc:
        print(f"demo: setting up OpenBao failed: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(KeyboardInterrupt, _Interrupted):
            say(f"stopping OpenBao (pid {bao.pid})")
            bao.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            say("stopped; temporary files removed")
        signal.signal(signal.SIGTERM, previous)


def banner(
    listen: Address, metrics: Address, interval: float, bao: OpenBaoDevServer, product_id: str
) -> list[str]:
    """The ready message: a curl line, the metrics URL, and how to rotate."""
    curl = (
        f"curl -s -X POST http://{listen}/v1/token -H 'Content-Type: application/json' "
        "-H 'X-Sidecar-Request: true' -d '{\"userId\": \"u-123\"}'"
    )
    rotate = (
        f"VAULT_ADDR={bao.addr} VAULT_TOKEN={bao.root_token} {shlex.quote(str(bao.bao))} "
        f"kv put -mount={KV_MOUNT} {KV_PATH} product_id={product_id} "
        "product_secret=$(openssl rand -hex 32)"
    )
    return [
        "[demo] ready. Sign a token for user u-123:",
        "",
        f"    {curl}",
        "",
        f"[demo] metrics: http://{metrics}/metrics   health: http://{metrics}/readyz",
        f"[demo] rotate the secret (picked up within {interval * (1 + JITTER):g} s: the "
        f"{interval:g} s refresh interval, +-{JITTER:.0%} jitter; at once on SIGHUP):",
        "",
        f"    {rotate}",
        "",
        "[demo] Ctrl-C stops the sidecar, then OpenBao.",
    ]
