"""serve() run on the test's own event loop: what a failed start leaves behind and what a
shutdown closes, observed through the sockets a caller holds."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.config import Settings, load_settings
from sidecar.server import serve

from .support import ROOT, free_port, write_secret


def settings_for(tmp_path: Path, **env: str) -> Settings:
    secret = tmp_path / "s.json"
    write_secret(secret)
    return load_settings(
        {"REDITUS_SIDECAR_SECRET_SOURCE": "file", "REDITUS_SIDECAR_SECRET_FILE": str(secret), **env}
    )


async def connect_when_listening(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = time.monotonic() + 20
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def test_a_failed_start_closes_the_listeners_and_removes_its_socket(tmp_path: Path) -> None:
    """The metrics port is taken: the signing TCP port and socket, already open, are closed
    and the socket file removed, so a restart finds nothing of this attempt."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    path = tmp_path / "sidecar.sock"
    signing_port = free_port()
    settings = settings_for(
        tmp_path,
        REDITUS_SIDECAR_LISTEN=f"127.0.0.1:{signing_port}",
        REDITUS_SIDECAR_UNIX_SOCKET=str(path),
        REDITUS_SIDECAR_METRICS_LISTEN=f"127.0.0.1:{busy.getsockname()[1]}",
    )
    try:
        assert await serve(settings) == 1
    finally:
        busy.close()
    assert not path.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", signing_port), timeout=5).close()


async def test_shutdown_closes_connections_kept_alive_on_the_signing_listener(
    tmp_path: Path,
) -> None:
    """An idle keep-alive connection gets its end of stream when serve() returns, not when
    the idle timeout (10 s) would have closed it."""
    port = free_port()
    stop = asyncio.Event()
    settings = settings_for(
        tmp_path,
        REDITUS_SIDECAR_LISTEN=f"127.0.0.1:{port}",
        REDITUS_SIDECAR_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
    )
    server = asyncio.create_task(serve(settings, stop=stop))
    reader, writer = await connect_when_listening(port)
    try:
        writer.write(f"GET /no-such-path HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404"), head
        assert b"connection: close" not in head.lower()
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        stop.set()
        assert await server == 0
        # 5 s bounds a failure (the idle timeout is 10 s); the end comes with serve()'s return
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


@pytest.mark.integration
def test_a_file_source_sidecar_never_loads_the_vault_client(tmp_path: Path) -> None:
    """hvac and requests cost about 0.1 s and 5 MB at start (measured); a sidecar that reads
    its secret from a file builds everything it runs without them."""
    secret = tmp_path / "s.json"
    write_secret(secret)
    program = (
        "import sys\n"
        "from sidecar.config import load_settings\n"
        "from sidecar.metrics import Metrics\n"
        "from sidecar.server import serve  # noqa: F401\n"
        "from sidecar.sources.factory import build_sources\n"
        "from prometheus_client import CollectorRegistry\n"
        f"settings = load_settings({{'REDITUS_SIDECAR_SECRET_SOURCE': 'file',"
        f" 'REDITUS_SIDECAR_SECRET_FILE': {str(secret)!r}}})\n"
        "build_sources(settings, Metrics(CollectorRegistry(), ['default'], 'test'))\n"
        "print(sorted(m for m in ('hvac', 'requests') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
