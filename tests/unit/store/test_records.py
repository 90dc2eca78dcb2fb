"""What the store keeps: hashed inputs keep no text; the store's settings are refused by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config.store import StoreConfig
from service.errors import ConfigError
from service.store import store_url
from service.store.records import config_digest, digest, hashed_input
from tests.fakes import FAKE_CONFIG, fake_config


def test_hashed_input_keeps_digests_of_every_text() -> None:
    given = {"instruction": "be kind", "input_text": "hello", "messages": [{"role": "user", "content": "hello"}]}
    out = hashed_input(given)
    assert out["instruction"] == {"sha256": digest("be kind")}
    assert out["messages"] == [{"role": "user", "content": {"sha256": digest("hello")}}]
    assert "hello" not in str(out) and "kind" not in str(out)


def test_config_digest_changes_with_the_config() -> None:
    a = fake_config().model_dump(mode="json")
    b = fake_config(FAKE_CONFIG.replace("fuse_top_k: 2", "fuse_top_k: 3")).model_dump(mode="json")
    assert config_digest(a) == config_digest(dict(a)) and config_digest(a) != config_digest(b)


def test_store_urls_run_on_async_drivers(tmp_path: Path) -> None:
    assert str(store_url(StoreConfig(), tmp_path)) == f"sqlite+aiosqlite:///{tmp_path}/store.db"
    pg = store_url(StoreConfig(url="postgresql://u:secret@db:5432/gw"), tmp_path)
    assert pg.drivername == "postgresql+asyncpg" and "secret" not in pg.render_as_string(hide_password=True)


@pytest.mark.parametrize(
    ("store", "where"),
    [
        ("{url: 'mysql://x/y'}", "store.url"),
        ("{retention_days: 0}", "store.retention_days"),
        ("{queue_size: 0}", "store.queue_size"),
        ("{nope: 1}", "store.nope"),
    ],
)
def test_bad_store_settings_are_refused_by_field(store: str, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        fake_config(FAKE_CONFIG + f"store: {store}\n")
    assert where in str(e.value)


def test_an_ensemble_can_opt_out() -> None:
    cfg = fake_config(
        FAKE_CONFIG.replace("plain: {members: [a, b], top_k: 1}", "plain: {members: [a, b], store: false}")
    )
    assert cfg.ensembles["plain"].store is False and cfg.ensembles["main"].store is True and cfg.store is None
