"""build_sources and SourceSet on their own: one source per product, of the configured kind;
the Vault session shared by every product and started and closed once (after the sources,
in reverse order), revoking its token only when asked (serve's graceful shutdown, never
`check`). Reading through real sources is in test_vault_source.py and test_server.py.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.config import load_settings
from sidecar.sources.factory import SourceSet, build_sources
from sidecar.sources.file import FileSource
from sidecar.sources.vault import VaultSession, VaultSource
from tests.openbao import unexported
from tests.support import write_secret

VAULT = {"VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "t"}


def two_products(tmp_path: Path) -> Path:
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[products.eu]\nsecret_file = "{tmp_path / "eu.json"}"\nkv_path = "reditus/eu"\n'
        f'[products.us]\nsecret_file = "{tmp_path / "us.json"}"\nkv_path = "reditus/us"\n'
    )
    return config


async def test_file_mode_reads_each_products_own_file(tmp_path: Path) -> None:
    write_secret(tmp_path / "eu.json", product_id="prod-eu")
    write_secret(tmp_path / "us.json", product_id="prod-us")
    settings = load_settings({"REDITUS_SIDECAR_SECRET_SOURCE": "file"}, str(two_products(tmp_path)))
    built = build_sources(settings, unexported())
    assert built.shared == []
    assert all(isinstance(source, FileSource) for source in built.sources.values())
    read = {name: (await source.fetch()).product_id for name, source in built.sources.items()}
    assert read == {"eu": "prod-eu", "us": "prod-us"}


def test_vault_mode_shares_one_session_between_the_products(tmp_path: Path) -> None:
    settings = load_settings(VAULT, str(two_products(tmp_path)))
    built = build_sources(settings, unexported())
    (session,) = built.shared
    assert isinstance(session, VaultSession)
    assert sorted(built.sources) == ["eu", "us"]
    for name, source in built.sources.items():
        assert isinstance(source, VaultSource)
        assert source.session is session
        assert source.product.kv_path == f"reditus/{name}"


def test_transit_mode_builds_no_source_and_no_second_session() -> None:
    """Transit mode owns its Vault session; a session here would log in a second time."""
    env = {**VAULT, "REDITUS_SIDECAR_SECRET_SOURCE": "transit", "REDITUS_SIDECAR_PRODUCT_ID": "p"}
    built = build_sources(load_settings(env), unexported())
    assert built.sources == {}
    assert built.shared == []


class Recorder:
    """A source or a shared resource that notes what was done to it."""

    def __init__(self, name: str, events: list[tuple[object, ...]]) -> None:
        self.name = name
        self.events = events

    async def start(self) -> None:
        self.events.append(("start", self.name))

    async def close(self, **kwargs: bool) -> None:
        self.events.append(("close", self.name, *kwargs.values()))


async def test_shared_resources_start_once_and_close_after_the_sources() -> None:
    events: list[tuple[object, ...]] = []
    built = SourceSet(
        {"eu": Recorder("eu", events)},  # type: ignore[dict-item]
        [Recorder("session", events), Recorder("cache", events)],
    )
    await built.start()
    assert events == [("start", "session"), ("start", "cache")]
    events.clear()
    await built.close()  # `check` and `sign`: the token lives out its TTL
    assert events == [("close", "eu"), ("close", "cache", False), ("close", "session", False)]
    events.clear()
    await built.close(revoke=True)  # serve's graceful shutdown
    assert events == [("close", "eu"), ("close", "cache", True), ("close", "session", True)]
