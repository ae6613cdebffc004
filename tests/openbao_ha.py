"""A 3-node OpenBao Raft cluster on loopback behind HAProxy, for the failover tests and
`bench/failover.py`.

What a `vault-active` Kubernetes Service gives in production: HAProxy health-checks every
node with `GET /v1/sys/health` and sends traffic only to the node answering 200 (the
active one; standbys answer 429, sealed nodes 503). Faults are real: the leader is killed
(SIGKILL) or stopped (SIGTERM, it hands leadership over), a node is restarted and
unsealed, the whole cluster is sealed, HAProxy is restarted. Every process is started on
ports picked free and stopped by its own PID; logs stay in the work directory and their
tails go into failure messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac

from sidecar.devserver import find_bao

HOST = "127.0.0.1"
# HAProxy health checks: every 200 ms, one failed check marks a node down and one good
# check marks it up. A leader loss is then seen within ~0.2 s of the new leader
# answering 200; OpenBao elects one ~2.5 s after a SIGKILL (performance_multiplier = 1).
CHECK_INTER_MS = 200
CHECK_TIMEOUT_MS = 500


def haproxy_binary() -> str:
    found = shutil.which("haproxy", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if found is None:
        raise RuntimeError("haproxy not found: scripts/setup installs Debian's haproxy package")
    return found


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together, so never the same one)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait(condition: Callable[[], object], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout:g} s: {what()}")
        time.sleep(0.05)


def health(addr: str, timeout: float = 1.0) -> int:
    """The status of `GET /v1/sys/health` (200 active, 429 standby, 503 sealed, 501
    uninitialised), or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=timeout) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class Node:
    """One `bao server` of the cluster; keeps its ports and Raft data across restarts."""

    name: str
    api_port: int
    cluster_port: int
    workdir: Path
    bao: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def config(self) -> Path:
        return self.workdir / f"{self.name}.hcl"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def write_config(self, peers: list[Node]) -> None:
        joins = "".join(
            f'  retry_join {{\n    leader_api_addr = "{peer.addr}"\n  }}\n'
            for peer in peers
            if peer is not self
        )
        data = self.workdir / f"{self.name}-data"
        data.mkdir(exist_ok=True)
        self.config.write_text(
            f"""storage "raft" {{
  path = "{data}"
  node_id = "{self.name}"
  performance_multiplier = 1
{joins}}}
listener "tcp" {{
  address = "{HOST}:{self.api_port}"
  cluster_address = "{HOST}:{self.cluster_port}"
  tls_disable = true
}}
api_addr = "{self.addr}"
cluster_addr = "http://{HOST}:{self.cluster_port}"
disable_mlock = true
ui = false
log_level = "info"
"""
        )

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # no token helper writes into the user's home
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bao), "server", f"-config={self.config}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        _wait(
            lambda: self._exited() or health(self.addr) != 0,
            20,
            lambda: f"{self.name} did not listen\n{self.tail()}",
        )
        if self._exited():
            raise RuntimeError(f"{self.name} exited at start\n{self.tail()}")

    def _exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def running(self) -> bool:
        return not self._exited()

    def signal(self, sig: int) -> None:
        """Send `sig` and wait for the process to end (SIGTERM: a graceful step-down)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)

    def tail(self) -> str:
        return _tail(self.log_path)


@dataclass
class HAProxy:
    """`haproxy -f cfg -db` in front of the nodes: only the active node gets traffic."""

    port: int
    nodes: list[Node]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def addr(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    @property
    def stats_socket(self) -> Path:
        return self.workdir / "haproxy.sock"

    def _command(self, command: str) -> str:
        """One command on HAProxy's runtime API (its unix stats socket)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    def up(self) -> list[str]:
        """The nodes HAProxy sends traffic to now (`show stat`). HAProxy starts with every
        server up until its first check says otherwise."""
        try:
            text = self._command("show stat")
        except OSError:
            return []
        rows = [line.split(",") for line in text.splitlines() if line and line[0] != "#"]
        return [
            row[1]
            for row in rows
            if len(row) > 17
            and row[0] == "vault_active"
            and row[1] not in ("FRONTEND", "BACKEND")
            and row[17] == "UP"
        ]

    def set_servers(self, *, enabled: bool) -> None:
        """Take every node out of (or back into) rotation: with none, HAProxy answers
        503 at once, as a load balancer with no healthy backend does."""
        verb = "enable" if enabled else "disable"
        for node in self.nodes:
            self._command(f"{verb} server vault_active/{node.name}")

    def write_config(self) -> Path:
        servers = "".join(
            f"  server {node.name} {HOST}:{node.api_port} check\n" for node in self.nodes
        )
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            f"""global
  maxconn 512
  stats socket {self.stats_socket} mode 600 level admin
defaults
  mode http
  # a refused or lost connection is retried once, at once, on another node; with none
  # up HAProxy answers 503 (what a Service with no ready endpoint does: fail fast)
  timeout connect 500ms
  timeout client 30s
  timeout server 30s
  timeout check {CHECK_TIMEOUT_MS}ms
  retries 1
  option redispatch 1
frontend vault
  bind {HOST}:{self.port}
  default_backend vault_active
backend vault_active
  option httpchk GET /v1/sys/health
  http-check expect status 200
  # ongoing requests to a node marked down are cut, not left to hang
  default-server inter {CHECK_INTER_MS}ms fastinter {CHECK_INTER_MS}ms downinter {CHECK_INTER_MS}ms fall 1 rise 1 on-marked-down shutdown-sessions
{servers}"""
        )
        return config

    def start(self) -> None:
        config = self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-f", str(config), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.starts += 1
        _wait(
            lambda: self.proc is None or self.proc.poll() is not None or self._listening(),
            10,
            lambda: f"haproxy did not listen\n{_tail(self.log_path)}",
        )
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited at start\n{_tail(self.log_path)}")

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex((HOST, self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Cluster:
    """Three OpenBao nodes (Raft) and HAProxy; `addr` is what the sidecar talks to."""

    workdir: Path
    nodes: list[Node] = field(default_factory=list)
    proxy: HAProxy | None = None
    root_token: str = ""
    unseal_key: str = ""

    @property
    def addr(self) -> str:
        assert self.proxy is not None
        return self.proxy.addr

    # --- clients ------------------------------------------------------------------------

    def client(self, addr: str | None = None, *, timeout: float = 5) -> hvac.Client:
        return hvac.Client(url=addr or self.addr, token=self.root_token, cert=(), timeout=timeout)

    def _unauthenticated(self, node: Node, method: str, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(  # noqa: S310 - loopback URL we built
            f"{node.addr}/v1/{path}",
            data=json.dumps(body).encode(),
            method=method,
            headers={"X-Vault-Token": self.root_token} if self.root_token else {},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            raw = response.read()
        return json.loads(raw) if raw else None

    # --- start and stop -------------------------------------------------------------------

    def start(self) -> Cluster:
        bao = find_bao()
        ports = _free_ports(7)
        self.nodes = [
            Node(f"n{i + 1}", ports[2 * i], ports[2 * i + 1], self.workdir, bao) for i in range(3)
        ]
        for node in self.nodes:
            node.write_config(self.nodes)
            node.start()
        first = self.nodes[0]
        init = self._unauthenticated(
            first, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}
        )
        self.unseal_key, self.root_token = init["keys"][0], init["root_token"]
        self.unseal(first)
        _wait(lambda: health(first.addr) == 200, 30, lambda: f"n1 not active\n{first.tail()}")
        # New voters are promoted once stable for this long (default 10 s): keep it short.
        self.client(first.addr).write_data(
            "sys/storage/raft/autopilot/configuration",
            data={"server_stabilization_time": "2s", "cleanup_dead_servers": False},
        )
        for node in self.nodes[1:]:
            self.unseal(node)
        self.wait_healthy()
        self.client(first.addr).sys.enable_secrets_engine(
            "kv", path="secret", options={"version": "2"}
        )
        for node in self.nodes:  # standbys serve reads themselves: wait for each
            _wait(
                lambda n=node: self._kv_ready(n),  # type: ignore[misc]
                30,
                lambda: "KV v2 at secret/ not ready\n" + self.logs(),
            )
        self.proxy = HAProxy(ports[6], self.nodes, self.workdir)
        self.proxy.start()
        self.wait_serving()
        return self

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for node in self.nodes:
            node.stop()

    # --- state ------------------------------------------------------------------------------

    def unseal(self, node: Node) -> None:
        """Unseal one node and wait until it serves (a joining node uses the key to join
        the Raft cluster first, in the background)."""
        _wait(
            lambda: self._unsealed(node),
            30,
            lambda: f"{node.name} could not be unsealed\n{node.tail()}",
        )

    def _unsealed(self, node: Node) -> bool:
        status = health(node.addr)
        if status in (200, 429):
            return True
        if status in (501, 503):
            with contextlib.suppress(OSError, ValueError):
                self._unauthenticated(node, "PUT", "sys/unseal", {"key": self.unseal_key})
            time.sleep(0.2)  # pacing of the unseal calls; the loop waits on health
        return False

    def leader(self) -> Node:
        """The node answering 200 on sys/health now (waits for one)."""
        found: list[Node] = []

        def active() -> bool:
            found[:] = [n for n in self.nodes if n.running() and health(n.addr) == 200]
            return bool(found)

        _wait(active, 30, lambda: "no active node\n" + self.logs())
        return found[0]

    def peers(self) -> list[dict[str, Any]]:
        """`bao operator raft list-peers`, through the leader."""
        answer = self.client(self.leader().addr).read("sys/storage/raft/configuration")
        return list(answer["data"]["config"]["servers"])

    def _all_voters_healthy(self) -> bool:
        try:
            state = self.client(self.leader().addr).read("sys/storage/raft/autopilot/state")
        except (hvac.exceptions.VaultError, OSError, RuntimeError):
            return False
        servers = state["data"]["servers"] if state else {}
        running = {n.name for n in self.nodes if n.running()}
        return set(servers) >= running and all(
            servers[name]["status"] in ("leader", "voter") and servers[name]["healthy"]
            for name in running
        )

    def _kv_ready(self, node: Node) -> bool:
        """A new KV v2 mount refuses requests until it has set itself up."""
        try:
            self.client(node.addr).secrets.kv.v2.read_secret_version(
                path="probe", mount_point="secret", raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return True  # 404: the mount answers; while upgrading it answers 400
        except hvac.exceptions.VaultError:
            return False
        return True

    def wait_healthy(self, timeout: float = 60) -> None:
        """Every running node unsealed and a healthy voter (autopilot's own view)."""
        _wait(
            lambda: (
                all(health(n.addr) in (200, 429) for n in self.nodes if n.running())
                and self._all_voters_healthy()
            ),
            timeout,
            lambda: "cluster not healthy\n" + self.logs(),
        )

    def wait_serving(self, timeout: float = 30, *, not_on: Node | None = None) -> float:
        """Block until HAProxy routes to the active node only (another one than `not_on`);
        returns when that happened."""
        assert self.proxy is not None
        proxy = self.proxy

        def serving() -> bool:
            up = proxy.up()
            return len(up) == 1 and (not_on is None or up[0] != not_on.name)

        _wait(
            lambda: serving() and health(self.addr) == 200,
            timeout,
            lambda: "HAProxy routes to no active node\n" + self.logs(),
        )
        return time.monotonic()

    def logs(self) -> str:
        parts = [f"--- {n.name} ({n.addr}) ---\n{n.tail()}" for n in self.nodes]
        if self.proxy is not None:
            parts.append(f"--- haproxy ---\n{_tail(self.proxy.log_path)}")
        return "\n".join(parts)

    # --- faults -----------------------------------------------------------------------------

    def kill_leader(self, sig: int = signal.SIGKILL) -> Node:
        """SIGKILL (crash) or SIGTERM (graceful: hands leadership over) the active node;
        returns once the process is gone."""
        node = self.leader()
        node.signal(sig)
        return node

    def restart(self, node: Node) -> None:
        """Start a stopped node again on its data and ports, unseal it, wait until it is a
        healthy voter again."""
        node.start()
        self.unseal(node)
        self.wait_healthy()

    def seal_all(self) -> None:
        """`sys/seal` on every node, standbys first (they check the token with the active)."""
        leader = self.leader()
        for node in [n for n in self.nodes if n is not leader] + [leader]:
            self._unauthenticated(node, "PUT", "sys/seal", {})

    def unseal_all(self) -> None:
        for node in self.nodes:
            self.unseal(node)
        self.wait_healthy()

    def restart_proxy(self) -> None:
        assert self.proxy is not None
        self.proxy.stop()
        self.proxy.start()


@contextlib.contextmanager
def openbao_cluster(workdir: Path | None = None) -> Iterator[Cluster]:
    """A started cluster, stopped by PID afterwards (work directory removed if ours)."""
    own = workdir is None
    cluster = Cluster(workdir or Path(tempfile.mkdtemp(prefix="reditus-openbao-ha-")))
    cluster.workdir.mkdir(parents=True, exist_ok=True)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if own:
            shutil.rmtree(cluster.workdir, ignore_errors=True)
