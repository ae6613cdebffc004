"""REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN against a real OpenBao: after SIGTERM the token the
sidecar logged in for is gone; a token it was handed (VAULT_TOKEN or a token file)
survives unless the value is `all`; a hung Vault does not keep the sidecar from exiting.
The one-shot commands `check` and `sign` revoke the token they logged in for the same way,
and never a handed one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import hvac.exceptions
import pytest

from sidecar.devserver import OpenBaoDevServer
from tests.openbao import Bao, unique, vault_sidecar, write_file
from tests.support import ROOT, base_env, signed_with

pytestmark = pytest.mark.integration


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


SECRET = "revoke-" + "r" * 64


def approle_env(bao: Bao, tmp_path: Path, **role_options: object) -> tuple[str, dict[str, str]]:
    path = unique("revoke")
    bao.put(path, product_id="prod-revoke", product_secret=SECRET)
    role, role_id, secret_id = bao.approle(
        [bao.read_policy(path)], token_ttl="300s", **role_options
    )
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


def handed_token(bao: Bao) -> tuple[dict[str, str], str]:
    """A fresh KV path and a token allowed to read it: (its env without the token, the
    token's answer from Vault)."""
    path = unique("handed")
    bao.put(path, product_id="prod-handed", product_secret=SECRET)
    handed = bao.root().auth.token.create(policies=[bao.read_policy(path)], ttl="300s")["auth"]
    return {"REDITUS_SIDECAR_KV_PATH": path}, handed


def handed_by(how: str, token: str, tmp_path: Path) -> dict[str, str]:
    if how == "VAULT_TOKEN":
        return {"VAULT_TOKEN": token}
    return {"REDITUS_SIDECAR_VAULT_TOKEN_FILE": str(write_file(tmp_path / "token", token))}


@pytest.mark.parametrize("how", ["VAULT_TOKEN", "token file"])
def test_revoke_true_leaves_a_handed_token_alone(bao: Bao, tmp_path, how: str) -> None:
    """`true` (the default, here set explicitly) revokes only a token the sidecar logged in
    for. A token file is re-read at every login, yet its token is still handed: Vault Agent
    (or whoever wrote it) goes on using it after this pod is gone."""
    env, handed = handed_token(bao)
    env.update(handed_by(how, handed["client_token"], tmp_path))
    with vault_sidecar(bao.addr, REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN="true", **env) as sidecar:
        assert sidecar.stop(signal.SIGTERM) == 0
    assert alive(bao, handed["accessor"])
    assert "revoked the Vault token at shutdown" not in messages(sidecar)


# --- the one-shot commands ------------------------------------------------------------------


COMMANDS = {"check": ["check"], "sign": ["sign", "--user-id", "u-revoke"]}


def one_shot(bao: Bao, command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *COMMANDS[command]],
        env=base_env(VAULT_ADDR=bao.addr, REDITUS_SIDECAR_VAULT_TIMEOUT="3", **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def succeeded(result: subprocess.CompletedProcess[str], command: str) -> list[str]:
    """The command's stdout lines, after checking it did its job."""
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    if command == "check":
        assert "check: product default: ok (product id 'prod-revoke', version 1)" in lines
    else:
        assert any(signed_with(line, SECRET) for line in lines), lines
    return lines


@pytest.mark.parametrize("command", ["check", "sign"])
def test_one_shot_commands_revoke_the_token_they_logged_in_for(
    bao: Bao, tmp_path, command: str
) -> None:
    """Each run logs in; without the revocation each left a live token for its whole TTL."""
    role, env = approle_env(bao, tmp_path)
    for _ in range(2):
        succeeded(one_shot(bao, command, env), command)
    assert accessors_of_role(bao, role) == []
    # ... and only when told to: `false` keeps the token, as it does for serve.
    succeeded(
        one_shot(bao, command, {**env, "REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN": "false"}), command
    )
    assert len(accessors_of_role(bao, role)) == 1


@pytest.mark.parametrize("mode", ["true", "all"])
@pytest.mark.parametrize("how", ["VAULT_TOKEN", "token file"])
@pytest.mark.parametrize("command", ["check", "sign"])
def test_one_shot_commands_never_revoke_a_handed_token(
    bao: Bao, tmp_path, command: str, how: str, mode: str
) -> None:
    """Not even with `all`: a `check` or `sign` run next to serve (kubectl exec, the same
    environment) shares a handed token with it, and would cut the running sidecar off."""
    env, handed = handed_token(bao)
    env.update(handed_by(how, handed["client_token"], tmp_path))
    env["REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN"] = mode
    assert one_shot(bao, command, env).returncode == 0
    assert alive(bao, handed["accessor"])


def test_a_token_a_one_shot_command_cannot_revoke_is_a_warning(bao: Bao, tmp_path) -> None:
    """A role without the `default` policy gets tokens that may not revoke themselves: the
    command still succeeds, and says the token lapses at its TTL (never quoting it)."""
    role, env = approle_env(bao, tmp_path, token_no_default_policy=True)
    lines = succeeded(one_shot(bao, "check", env), "check")
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(r["level"], r["msg"]) for r in records] == [
        ("warning", "Vault refused to revoke the token at shutdown; it lapses at its TTL")
    ]
    (accessor,) = accessors_of_role(bao, role)
    assert accessor not in "\n".join(lines)


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
