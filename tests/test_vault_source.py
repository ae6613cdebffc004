"""KV v2 reads through the Vault source against a real OpenBao: versions, rotation,
deleted/destroyed versions, missing fields, missing paths, permission changes and
Vault's Retry-After. The refresher keeps the last good secret; here we check that
each failure is an error of the right kind with a precise message.
"""

from __future__ import annotations

import pytest

from sidecar.config import Product
from sidecar.errors import SecretInvalid, SecretUnavailable
from sidecar.sources.vault import VaultSession, VaultSource
from sidecar.sources.vault_client import VaultPermissionDenied
from tests.openbao import Bao, approle_session, logins, session_for, unexported, unique, write_file


async def test_reads_id_secret_and_version(openbao, kv_path, leak_guard) -> None:
    session, source = session_for(openbao, unexported(), REDITUS_SIDECAR_KV_PATH=kv_path)
    leak_guard.add("secret-one-" + "x" * 64, openbao.root_token)
    try:
        material = await source.fetch()
        assert material.product_id == "prod-1"
        assert material.secret.reveal() == "secret-one-" + "x" * 64
        assert material.version == 1
        assert source.description == f"vault secret/{kv_path}"
        assert await source.changed() is False
        assert "secret-one" not in repr(material)
    finally:
        await session.close()


async def test_rotation_is_seen_as_a_new_version(openbao, kv_path) -> None:
    session, source = session_for(openbao, unexported(), REDITUS_SIDECAR_KV_PATH=kv_path)
    try:
        assert (await source.fetch()).version == 1
        openbao.put(kv_path, product_id="prod-1", product_secret="rotated-" + "y" * 64)
        material = await source.fetch()
        assert material.version == 2
        assert material.secret.reveal() == "rotated-" + "y" * 64
    finally:
        await session.close()


async def test_custom_field_names(openbao) -> None:
    path = unique("fields")
    openbao.put(path, id="p-9", key="k" * 64)
    session, source = session_for(
        openbao,
        unexported(),
        REDITUS_SIDECAR_KV_PATH=path,
        REDITUS_SIDECAR_PRODUCT_ID_KEY="id",
        REDITUS_SIDECAR_SECRET_KEY="key",
    )
    try:
        assert (await source.fetch()).product_id == "p-9"
    finally:
        await session.close()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"product_id": "prod-1"}, "missing field(s) 'product_secret'"),
        ({"product_secret": "s" * 64}, "missing field(s) 'product_id'"),
        ({"product_id": "prod-1", "product_secret": ""}, "'product_secret' must be a non-empty"),
        ({"product_id": " ", "product_secret": "s" * 64}, "'product_id' must be a non-empty"),
    ],
)
async def test_missing_or_empty_fields(openbao, kv_path, data, expected) -> None:
    session, source = session_for(openbao, unexported(), REDITUS_SIDECAR_KV_PATH=kv_path)
    try:
        openbao.put(kv_path, **data)
        with pytest.raises(SecretInvalid) as caught:
            await source.fetch()
        assert expected in str(caught.value)
        assert f"secret/{kv_path} version 2" in str(caught.value)
    finally:
        await session.close()


async def test_deleted_then_destroyed_latest_version(openbao, kv_path) -> None:
    root = openbao.root()
    session, source = session_for(openbao, unexported(), REDITUS_SIDECAR_KV_PATH=kv_path)
    try:
        openbao.put(kv_path, product_id="prod-1", product_secret="v2-" + "z" * 64)
        root.secrets.kv.v2.delete_latest_version_of_secret(kv_path)
        with pytest.raises(SecretInvalid) as caught:
            await source.fetch()
        assert "latest version (2) is deleted" in str(caught.value)
        assert "undelete" in str(caught.value)

        root.secrets.kv.v2.undelete_secret_versions(kv_path, versions=[2])
        assert (await source.fetch()).version == 2

        root.secrets.kv.v2.destroy_secret_versions(kv_path, versions=[2])
        with pytest.raises(SecretInvalid) as caught:
            await source.fetch()
        assert "latest version (2) is destroyed" in str(caught.value)
    finally:
        await session.close()


@pytest.mark.parametrize("mount", ["secret", "no-such-mount"])
async def test_missing_path_names_mount_and_path(openbao, mount) -> None:
    path = unique("absent")
    session, source = session_for(
        openbao, unexported(), REDITUS_SIDECAR_KV_PATH=path, REDITUS_SIDECAR_KV_MOUNT=mount
    )
    try:
        with pytest.raises(SecretUnavailable) as caught:
            await source.fetch()
        message = str(caught.value)
        assert "HTTP 404" in message
        assert f"REDITUS_SIDECAR_KV_MOUNT ({mount!r})" in message
        assert f"REDITUS_SIDECAR_KV_PATH ({path!r})" in message
    finally:
        await session.close()


async def test_permission_denied_after_policy_change(
    openbao, kv_path, tmp_path, vault_metrics, registry, leak_guard
) -> None:
    policy = openbao.read_policy(kv_path)
    session, source = approle_session(
        openbao, kv_path, tmp_path, vault_metrics, leak_guard, policy=policy
    )
    try:
        assert (await source.fetch()).version == 1
        openbao.read_policy("somewhere-else", name=policy)  # the operator narrows the policy
        with pytest.raises(VaultPermissionDenied) as caught:
            await source.fetch()
        message = str(caught.value)
        assert f'"read" on path "secret/data/{kv_path}"' in message
        assert "policies" in message
        # The 403 made the session log in again once and retry the read once.
        assert logins(registry, "approle") == 2
        openbao.read_policy(kv_path, name=policy)
        assert (await source.fetch()).version == 1
    finally:
        await session.close()


async def test_products_share_one_session(openbao, tmp_path, vault_metrics, registry) -> None:
    paths = [unique("multi"), unique("multi")]
    for number, path in enumerate(paths):
        openbao.put(path, product_id=f"prod-{number}", product_secret="m" * 64)
    policy = unique("multi")
    openbao.policy(
        policy,
        "".join(f'path "secret/data/{p}" {{ capabilities = ["read"] }}\n' for p in paths),
    )
    _, role_id, secret_id = openbao.approle([policy])
    settings = openbao.settings(
        REDITUS_SIDECAR_VAULT_AUTH="approle",
        REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
        REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(write_file(tmp_path / "sid", secret_id)),
    )
    session = VaultSession(settings.vault, vault_metrics)
    sources = [
        VaultSource(session, Product(f"p{n}", "secret", p, "product_id", "product_secret", None))
        for n, p in enumerate(paths)
    ]
    try:
        assert [(await s.fetch()).product_id for s in sources] == ["prod-0", "prod-1"]
        assert logins(registry, "approle") == 1
    finally:
        await session.close()


async def test_rate_limited_read_carries_retry_after(openbao: Bao, kv_path) -> None:
    root = openbao.root()
    root.write_data("sys/quotas/config", data={"enable_rate_limit_response_headers": True})
    quota = unique("quota")
    root.write_data(
        f"sys/quotas/rate-limit/{quota}",
        data={"path": f"secret/data/{kv_path}", "rate": 1, "interval": "30s"},
    )
    session, source = session_for(openbao, unexported(), REDITUS_SIDECAR_KV_PATH=kv_path)
    try:
        with pytest.raises(SecretUnavailable) as caught:  # noqa: PT012 - the quota allows one
            await source.fetch()
            await source.fetch()
        assert "HTTP 429" in str(caught.value)
        assert caught.value.retry_after is not None
        assert 1 <= caught.value.retry_after <= 30
    finally:
        root.delete(f"sys/quotas/rate-limit/{quota}")
        await session.close()


async def test_vault_namespace(openbao: Bao) -> None:
    """VAULT_NAMESPACE reaches Vault: the same mount/path resolves inside the namespace."""
    import hvac

    namespace, path = unique("ns"), unique("ns-secret")
    openbao.root().write_data(f"sys/namespaces/{namespace}", data={})
    inside = hvac.Client(
        url=openbao.addr, token=openbao.root_token, cert=(), namespace=namespace, timeout=10
    )
    inside.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    inside.secrets.kv.v2.create_or_update_secret(
        path, secret={"product_id": "prod-ns", "product_secret": "n" * 64}
    )
    session, source = session_for(
        openbao, unexported(), VAULT_NAMESPACE=namespace, REDITUS_SIDECAR_KV_PATH=path
    )
    outside, outside_source = session_for(openbao, unexported(), REDITUS_SIDECAR_KV_PATH=path)
    try:
        assert (await source.fetch()).product_id == "prod-ns"
        with pytest.raises(SecretUnavailable, match="HTTP 404"):
            await outside_source.fetch()
    finally:
        await session.close()
        await outside.close()


def test_retry_after_header_forms() -> None:
    import email.utils
    import time

    from sidecar.sources.vault_client import parse_retry_after

    assert parse_retry_after("7") == 7
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = parse_retry_after(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert later is not None
    assert 50 < later <= 60
