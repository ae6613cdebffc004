"""A warm pytest for scripts/mutation: imports pytest, its plugins and the third-party
libraries the tests use once, then forks a child per request that runs pytest.main there.

Half of a mutant's cost was pytest starting up. The server never imports `sidecar` or
`tests`: each child imports them fresh from the tree, so it sees the mutant on disk.

    python forkserver.py SOCKET    (cwd and PYTHONPATH: the tree; exits after 10 idle minutes)

Protocol, one request per connection: a JSON line {"args": [...], "out": PATH} in; the
child's pid, then its exit code, each on a line, out.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys

sys.path[:] = [p for p in sys.path if p != os.path.dirname(os.path.abspath(__file__))]

# the warm-up: everything heavy that conftest and the test modules import, except our own
import aiohttp  # noqa: E402, F401
import cryptography.hazmat.primitives.asymmetric.rsa  # noqa: E402
import cryptography.x509  # noqa: E402, F401
import hvac  # noqa: E402, F401
import hypothesis  # noqa: E402, F401
import jwt  # noqa: E402, F401
import looptime  # noqa: E402, F401
import prometheus_client  # noqa: E402, F401
import pytest  # noqa: E402
import pytest_aiohttp  # noqa: E402, F401
import pytest_asyncio  # noqa: E402, F401
import pytest_timeout  # noqa: E402, F401
import schemathesis  # noqa: E402, F401
import yaml  # noqa: E402, F401

IDLE = 600.0


def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(IDLE)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            return
        with conn:
            request = json.loads(conn.makefile().readline())
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                os.setsid()  # its own group: the caller kills the whole test run on a timeout
                out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(out, 1)
                os.dup2(out, 2)
                code = 3
                try:
                    code = int(pytest.main(request["args"]))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            # the caller may be gone (it gave up on a hanging run): the server goes on
            with contextlib.suppress(OSError):
                conn.sendall(f"{pid}\n".encode())
            _, status = os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    serve(sys.argv[1])
