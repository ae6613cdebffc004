"""REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN against a real OpenBao: after SIGTERM the token the
sidecar logged in for is gone; a token it was handed survives (unless the value is
`all`); a hung Vault does not keep the sidecar from exiting.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import hvac.exceptions
import pytest

from sidecar.devserver import OpenBaoDevServer
from tests.openbao import Bao, unique, vault_sidecar, write_file


@pytest.fixture(scope="module")
def bao() -> Iterator[Bao]:
    """A server of this module's own: few tokens, so finding the sidecar's is cheap."""
    with OpenBaoDevServer() as server:
        yield Bao(server)


def accessors_of_role(bao: Bao, role: str) -> list[str]:
    """Accessors of the live tokens an AppRole login for `role` created."""
    root = bao.root()
    found = []
    for accessor in root.list("auth/token/accessors")["data"]["keys"]:
        data = root.auth.token.lookup_accessor(accessor)["data"]
        if (data.get("meta") or {}).get("role_name") == role:
            found.append(accessor)
    return found


def alive(bao: Bao, accessor: str) -> bool:
    try:
        bao.root().auth.token.lookup_accessor(accessor)
    except hvac.exceptions.InvalidRequest:  # "invalid accessor"
        return False
    return True


def approle_env(bao: Bao, tmp_path: Path) -> tuple[str, dict[str, str]]:
    path = unique("revoke")
    bao.put(path, product_id="prod-revoke", product_secret="revoke-" + "r" * 64)
    role, role_id, secret_id = bao.approle([bao.read_policy(path)], token_ttl="300s")
    return role, {
        "REDITUS_SIDECAR_VAULT_AUTH": "approle",
        "REDITUS_SIDECAR_VAULT_ROLE_ID": role_id,
        "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": str(write_file(tmp_path / "sid", secret_id)),
        "REDITUS_SIDECAR_KV_PATH": path,
    }


def messages(sidecar: object) -> list[str]:
    return [str(r.get("msg")) for r in sidecar.log_records()]  # type: ignore[attr-defined]


def test_sigterm_revokes_the_token_it_logged_in_for(bao: Bao, tmp_path) -> None:
    role, env = approle_env(bao, tmp_path)
    with vault_sidecar(bao.addr, **env) as sidecar:
        (accessor,) = accessors_of_role(bao, role)
        assert alive(bao, accessor)
        assert sidecar.stop(signal.SIGTERM) == 0
    assert not alive(bao, accessor)
    assert "revoked the Vault token at shutdown" in messages(sidecar)
    assert accessor not in sidecar.output()


def test_revocation_can_be_turned_off(bao: Bao, tmp_path) -> None:
    role, env = approle_env(bao, tmp_path)
    with vault_sidecar(bao.addr, REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN="false", **env) as sidecar:
        (accessor,) = accessors_of_role(bao, role)
        assert sidecar.stop(signal.SIGTERM) == 0
    assert alive(bao, accessor)


def test_a_handed_token_survives_unless_told(bao: Bao, tmp_path) -> None:
    path = unique("handed")
    bao.put(path, product_id="prod-handed", product_secret="handed-" + "h" * 64)
    policy = bao.read_policy(path)
    handed = bao.root().auth.token.create(policies=[policy], ttl="300s")["auth"]
    with vault_sidecar(
        bao.addr, VAULT_TOKEN=handed["client_token"], REDITUS_SIDECAR_KV_PATH=path
    ) as sidecar:
        assert sidecar.stop(signal.SIGTERM) == 0
    assert alive(bao, handed["accessor"])
    assert "revoked the Vault token at shutdown" not in messages(sidecar)

    # `all`: the operator says the handed token (here from a file) is the sidecar's to end.
    token_file = write_file(tmp_path / "token", handed["client_token"])
    with vault_sidecar(
        bao.addr,
        REDITUS_SIDECAR_VAULT_TOKEN_FILE=str(token_file),
        REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN="all",
        REDITUS_SIDECAR_KV_PATH=path,
    ) as sidecar:
        assert sidecar.stop(signal.SIGTERM) == 0
    assert not alive(bao, handed["accessor"])


def test_a_hung_vault_does_not_hold_up_the_exit(tmp_path) -> None:
    with OpenBaoDevServer() as server:
        hung = Bao(server)
        role, env = approle_env(hung, tmp_path)
        with vault_sidecar(hung.addr, **env) as sidecar:
            assert accessors_of_role(hung, role)  # logged in before Vault hangs
            server.pause()
            try:
                # a generous bound: the revocation gives up after min(2 s, VAULT_TIMEOUT=1 s)
                sidecar.proc.send_signal(signal.SIGTERM)
                assert sidecar.wait(timeout=20) == 0
            finally:
                server.resume()
        assert "revoking the Vault token at shutdown timed out; it lapses at its TTL" in messages(
            sidecar
        )
        # Whether the token survives is not asserted: the revoke-self request was already
        # sent, and the resumed server may still carry it out after the sidecar is gone.
