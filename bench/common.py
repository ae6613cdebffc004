"""Shared pieces of the benchmarks: processes pinned to cores, /proc readings, wrk runs.

Everything listens on loopback ports picked free, and every process started here is
stopped by its own PID (SIGTERM, then SIGKILL if it lingers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
SECRET = "bench-product-secret-0123456789abcdef0123456789abcdef0123456789abcdef01"
PRODUCT_ID = "prod-bench"
BODY = '{"userId":"u-123"}'
CLK_TCK = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:  # `python bench/x.py` from a clone, without installing
    sys.path.insert(0, str(ROOT))


def cores() -> tuple[str | None, str | None]:
    """(server core, load-generator core): separate cores when there are two or more."""
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        return None, None
    available = sorted(os.sched_getaffinity(0))
    return str(available[0]), str(available[1])


SERVER_CORE, LOAD_CORE = cores()


def pinned(args: list[str], core: str | None) -> list[str]:
    """Prefix a command with taskset so it (and every thread it starts) stays on one core."""
    return ["taskset", "-c", core, *args] if core is not None else args


def pin_pid(pid: int, core: str | None) -> None:
    """Move an already running process, all threads included, to one core."""
    if core is not None:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", core, str(pid)], check=True, capture_output=True
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment minus Vault/sidecar variables (a developer's VAULT_TOKEN stays out)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDITUS_SIDECAR_", "VAULT_", "BAO_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@dataclass
class Server:
    """A process we started, with the port it serves on."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    extra_pids: tuple[int, ...] = ()  # helpers whose CPU and memory count too (e.g. OpenBao)
    metrics_url: str = ""  # the sidecar's ops listener, when it is one

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.proc.pid, *self.extra_pids)

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start(
    name: str, args: list[str], env: dict[str, str], url: str, *, core: str | None = SERVER_CORE
) -> Server:
    """Start a server pinned to the server core; its output goes to a log file."""
    log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            pinned(args, core),
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, proc, url, log)


def start_sidecar(
    name: str, launcher: list[str] | None = None, *, core: str | None = SERVER_CORE, **env: str
) -> Server:
    """`reditus-sidecar serve` (or `launcher`) on free loopback ports, logging warnings
    only; `env` adds the secret source. Its ops URL is `server.metrics_url`."""
    port = free_port()
    metrics_url = f"http://127.0.0.1:{free_port()}"
    full = clean_env(
        REDITUS_SIDECAR_LISTEN=f"127.0.0.1:{port}",
        REDITUS_SIDECAR_METRICS_LISTEN=metrics_url.removeprefix("http://"),
        REDITUS_SIDECAR_LOG_LEVEL="warning",
        # The load generator is one uid: unlisted, it could hold only half the listener
        # (128 connections), as an app could; listed, it is held to no share.
        REDITUS_SIDECAR_ALLOWED_UIDS=str(os.getuid()),
        **env,
    )
    launcher = launcher or [PYTHON, "-m", "sidecar", "serve"]
    server = start(name, launcher, full, f"http://127.0.0.1:{port}", core=core)
    server.metrics_url = metrics_url
    return server


def wait_token(server: Server, timeout: float = 20.0) -> dict[str, object]:
    """Poll until the target signs a token; fail early if it died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.log.read_text()[-2000:]}")
        try:
            status, body = post(server.url)
            if status == 200:
                return body
            last = (status, body)
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not sign within {timeout}s (last: {last})")


def post(url: str, body: str = BODY, timeout: float = 5.0) -> tuple[int, dict[str, object]]:
    """One signing request with the headers the sidecar requires."""
    request = urllib.request.Request(  # noqa: S310 - loopback URL we built
        url + "/v1/token",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-Sidecar-Request": "true"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def write_secret(path: Path, product_id: str = PRODUCT_ID, secret: str = SECRET) -> None:
    """The file source's JSON, replaced atomically (temp file + rename, like Vault Agent)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"product_id": product_id, "product_secret": secret}))
    tmp.replace(path)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak (VmHWM) of a process, in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) / 1024 if match else 0.0


WRK_SCRIPT = BENCH / "wrk_token.lua"
WRK_LINE = re.compile(r"^BENCH (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", re.M)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx answers
    cpu_percent: float  # server processes' CPU over the run, % of one core
    rss_mib: float  # server processes' resident memory right after the run

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(server: Server, connections: int, seconds: float) -> LoadResult:
    """One wrk run (one thread, on the load core) against a target's signing route."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run scripts/setup (Debian package wrk)")
    cpu_before = sum(cpu_seconds(pid) for pid in server.pids)
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(WRK_SCRIPT),
        server.url + "/v1/token",
    ]
    started = time.monotonic()
    out = subprocess.run(pinned(args, LOAD_CORE), capture_output=True, text=True, check=True)
    wall = time.monotonic() - started
    cpu = sum(cpu_seconds(pid) for pid in server.pids) - cpu_before
    match = WRK_LINE.search(out.stdout)
    if match is None:
        raise RuntimeError(f"unexpected wrk output:\n{out.stdout}\n{out.stderr}")
    requests, micros, p50, p99, errors, non2xx = (int(g) for g in match.groups())
    return LoadResult(
        requests=requests,
        seconds=micros / 1e6,
        p50_ms=p50 / 1000,
        p99_ms=p99 / 1000,
        errors=errors + non2xx,
        cpu_percent=100 * cpu / wall,
        rss_mib=sum(rss_mib(pid) for pid in server.pids),
    )


@contextlib.contextmanager
def openbao(core: str | None = SERVER_CORE, extra_config: str | None = None) -> Iterator[object]:
    """An OpenBao dev server on loopback (stopped by PID on exit), pinned to `core`."""
    from sidecar.devserver import OpenBaoDevServer

    with OpenBaoDevServer(extra_config=extra_config) as bao:
        assert bao.pid is not None
        pin_pid(bao.pid, core)
        yield bao


def bao_cli(bao: object, *args: str, stdin: str | None = None) -> str:
    """Run the `bao` CLI against a dev server as root."""
    env = clean_env(**bao.env())  # type: ignore[attr-defined]
    result = subprocess.run(
        [str(bao.bao), *args],  # type: ignore[attr-defined]
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def put_secret(bao: object, secret: str = SECRET, product_id: str = PRODUCT_ID) -> str:
    """Write a new version of secret/reditus (what an operator's rotation does)."""
    return bao_cli(
        bao, "kv", "put", "secret/reditus", f"product_id={product_id}", f"product_secret={secret}"
    )


def machine() -> str:
    """One line naming the machine, for the tables."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{time.strftime('%Y-%m-%d')}, nproc {os.cpu_count()}, {model}, "
        f"Python {sys.version.split()[0]}, pinning "
        + (f"server core {SERVER_CORE}, load core {LOAD_CORE}" if SERVER_CORE else "off")
    )


@contextlib.contextmanager
def sidecar_file(launcher: list[str]) -> Iterator[Server]:
    """`reditus-sidecar serve` on a file secret."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        secret = Path(tmp) / "secret.json"
        write_secret(secret)
        server = start_sidecar(
            "sidecar",
            launcher,
            REDITUS_SIDECAR_SECRET_SOURCE="file",
            REDITUS_SIDECAR_SECRET_FILE=str(secret),
        )
        try:
            yield server
        finally:
            server.stop()
