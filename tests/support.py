"""Helpers for the tests: the real sidecar as a process (free ports, wait, stop by PID), the
reference `jose` signer, and a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
import pytest

TEST_SECRET = "test-product-secret-0123456789abcdef0123456789abcdef0123456789abcdef0123"
TEST_PRODUCT_ID = "prod-test"
ROOT = Path(__file__).resolve().parent.parent


def eventually(condition: Callable[[], object], *, timeout: float = 10.0, what: str = "") -> None:
    """Poll `condition` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or condition}")
        time.sleep(0.05)


async def eventually_async(
    condition: Callable[[], object], *, within: float = 10.0, what: str = ""
) -> None:
    """`eventually` for tests running on the event loop."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what or condition}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_secret(path: Path, product_id: str = TEST_PRODUCT_ID, secret: str = TEST_SECRET) -> None:
    """Write the file source's JSON atomically (temp file + rename, like Vault Agent)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"product_id": product_id, "product_secret": secret}))
    tmp.replace(path)


def base_env(**overrides: str) -> dict[str, str]:
    """The process environment minus anything Vault- or sidecar-related, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDITUS_", "VAULT_", "BAO_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@dataclass
class SidecarProcess:
    proc: subprocess.Popen[str]
    api_url: str
    metrics_url: str
    secret_file: Path | None
    secret: str = TEST_SECRET
    product_id: str = TEST_PRODUCT_ID
    lines: list[str] = field(default_factory=list)

    def log_records(self) -> list[dict[str, object]]:
        """Every JSON log line printed so far."""
        records = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_http(self.metrics_url + "/readyz", timeout=timeout, proc=self.proc, want=200)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and for every line it printed."""
        code = self.proc.wait(timeout)
        join_output(self.proc)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        join_output(self.proc)
        return int(self.proc.returncode)


def wait_http(
    url: str, *, timeout: float, proc: subprocess.Popen[str] | None = None, want: int = 200
) -> None:
    """Poll a URL until it answers `want`; fail early if the process died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                if response.status == want:
                    return
                last = response.status
        except urllib.error.HTTPError as exc:
            last = exc.code
            if exc.code == want:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {want} within {timeout}s (last: {last})")


_PUMPS: dict[int, threading.Thread] = {}  # output reader of each spawned process, by pid


def join_output(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """After `proc` exited: wait until its reader has taken every line it printed."""
    pump = _PUMPS.pop(proc.pid, None)
    if pump is not None:
        pump.join(timeout)


def _pump(stream: object, lines: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.append(line.rstrip("\n"))


def spawn(
    args: list[str], env: dict[str, str], wrapper: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], list[str]]:
    """Start `python -m sidecar ARGS` (behind `wrapper`, e.g. prlimit), collecting
    stdout+stderr lines in a thread."""
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "sidecar", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    _PUMPS[proc.pid] = pump
    return proc, lines


@contextlib.contextmanager
def run_sidecar(
    env: dict[str, str],
    *,
    secret_file: Path | None = None,
    wait: bool = True,
    wrapper: Sequence[str] = (),
) -> Iterator[SidecarProcess]:
    """Run `python -m sidecar serve` on free loopback ports; `env` adds or overrides."""
    api_port, metrics_port = free_port(), free_port()
    full = base_env(
        REDITUS_SIDECAR_LISTEN=f"127.0.0.1:{api_port}",
        REDITUS_SIDECAR_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
    )
    full.update(env)
    proc, lines = spawn(["serve"], full, wrapper)
    sidecar = SidecarProcess(
        proc=proc,
        api_url=f"http://127.0.0.1:{api_port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}",
        secret_file=secret_file,
        lines=lines,
    )
    try:
        if wait:
            sidecar.wait_ready()
        yield sidecar
    finally:
        sidecar.stop()


@contextlib.contextmanager
def start_sidecar(
    tmp_path: Path,
    *,
    wait: bool = True,
    write: bool = True,
    wrapper: Sequence[str] = (),
    **env_overrides: str,
) -> Iterator[SidecarProcess]:
    """The sidecar on a file secret (written unless `write=False`), refreshing every second."""
    secret_file = tmp_path / "reditus-secret.json"
    if write:
        write_secret(secret_file)
    env = {
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_SECRET_FILE": str(secret_file),
        "REDITUS_SIDECAR_REFRESH_INTERVAL": "1",
        "REDITUS_SIDECAR_BACKOFF_MAX": "2",
        **env_overrides,
    }
    with run_sidecar(env, secret_file=secret_file, wait=wait, wrapper=wrapper) as sidecar:
        yield sidecar


def request_token(
    api_url: str, body: object, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, object]]:
    """One signing request with the required headers (override with `headers`):
    (status, response headers, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - loopback
        api_url + "/v1/token",
        data=data,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-Sidecar-Request": "true",
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def post_token(
    api_url: str, body: object, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    """`request_token` without the response headers: (status, JSON body)."""
    status, _, answer = request_token(api_url, body, headers=headers)
    return status, answer


def sign_on_socket(path: Path, body: object | None = None) -> tuple[int, dict[str, object]]:
    """One signing request over the unix socket: (status, JSON body)."""

    async def call() -> tuple[int, dict[str, object]]:
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(
                "http://sidecar/v1/token",
                json=body or {"userId": "u"},
                headers={"Content-Type": "application/json", "X-Sidecar-Request": "true"},
            ) as response,
        ):
            return response.status, await response.json()

    return asyncio.run(call())


def signed_with(token: str, secret: str) -> bool:
    """Whether `token` is an HS512 JWT that verifies with `secret`."""
    try:
        jwt.decode(token, secret, algorithms=["HS512"])
    except jwt.InvalidTokenError:
        return False
    return True


def scrape(metrics_url: str) -> str:
    """The sidecar's /metrics exposition."""
    with urllib.request.urlopen(metrics_url + "/metrics", timeout=5) as response:  # noqa: S310
        return str(response.read().decode())


def metric_value(text: str, series: str) -> float:
    """One sample of an exposition, e.g. 'name{label="x"}'."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the scrape")


def scrape_value(metrics_url: str, series: str) -> float:
    return metric_value(scrape(metrics_url), series)


def exported_names(text: str) -> set[str]:
    """The sample names of an exposition (histograms as _bucket, _sum, _count)."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


# A client run as another user: the system interpreter (the test venv's may sit under a
# directory only root can enter) with the standard library only, behind setpriv.
_CLIENT = r"""
import json, socket, sys
path, method, body, headers = sys.argv[1], sys.argv[2], sys.argv[3].encode(), json.loads(sys.argv[4])
head = f"{method} /v1/token HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
if path.startswith("tcp:"):
    host, port = path[4:].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
else:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
with sock:
    sock.sendall(head.encode() + b"\r\n" + body)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
status = int(answer.split(b" ", 2)[1])
print(json.dumps({"status": status, "body": json.loads(answer.split(b"\r\n\r\n", 1)[1])}))
"""
SIGNING_HEADERS = {"Content-Type": "application/json", "X-Sidecar-Request": "true"}


def sign_as(
    path: Path | str,
    uid: int,
    gid: int,
    body: object | None = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, object]]:
    """One request on the unix socket (or on TCP, `path` being "tcp:HOST:PORT") from a
    process running as `uid`:`gid` with no supplementary groups."""
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            _CLIENT,
            str(path),
            method,
            json.dumps(body or {"userId": "u"}),
            json.dumps(SIGNING_HEADERS if headers is None else headers),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer = json.loads(result.stdout)
    return int(answer["status"]), answer["body"]


@contextlib.contextmanager
def open_socket_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is root-only), for a socket
    that clients of other uids connect to; its socket is made 0666 by `open_to_all` so
    the allow-list, not the file mode, is what decides."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="reditus-sock-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def open_to_all(socket_path: Path) -> None:
    eventually(socket_path.exists, what=f"{socket_path} is created")
    socket_path.chmod(0o666)


@contextlib.contextmanager
def answering_http(body: bytes, content_type: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback HTTP server answering every GET with 200 and `body` (a proxy or web page at
    VAULT_ADDR, or a minimal Vault); yields its URL and the headers of each request seen."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict[str, str]] = []

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


# --- the reference signer and a fake clock (fixtures `jose` and `clock` in conftest.py) ---

JOSE_DIR = Path(__file__).parent / "jose"


class JoseSigner:
    """A long-lived `node sign.mjs`: one JSON job per line in, one token per line out."""

    def __init__(self) -> None:
        node = shutil.which("node")
        if node is None or not (JOSE_DIR / "node_modules" / "jose").is_dir():
            pytest.fail("node and tests/jose/node_modules/jose are required: run scripts/setup")
        self.proc = subprocess.Popen(
            [node, "sign.mjs"],
            cwd=JOSE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def sign(
        self, secret: str, product_id: str, user_id: str, iat: int, exp: int | None = None
    ) -> str:
        job: dict[str, object] = {
            "secret": secret,
            "productId": product_id,
            "userId": user_id,
            "iat": iat,
        }
        if exp is not None:
            job["exp"] = exp
        assert self.proc.stdin
        assert self.proc.stdout
        # ensure_ascii keeps lone surrogates as \\uXXXX escapes, which JSON.parse restores.
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(10)


class FakeClock:
    """A clock that moves only when the test moves it (`clock.now += 5`).

    Calling it, or `monotonic()`, reads `now`; `perf_counter()` reads `perf`; `time()` is
    Unix time, `epoch + now`, or the real time when `epoch` is None. Hand it to what takes a
    clock (`SecretStore(monotonic=clock)`), or stand it in for a module's `time`
    (`monkeypatch.setattr(module, "time", clock)`): it has the three functions of `time`
    the sidecar reads."""

    def __init__(
        self, now: float = 100.0, *, perf: float = 1000.0, epoch: float | None = None
    ) -> None:
        self.now = now
        self.perf = perf
        self.epoch = epoch

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.perf

    def time(self) -> float:
        return time.time() if self.epoch is None else self.epoch + self.now
