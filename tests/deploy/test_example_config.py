"""deploy/config/ensemble.yaml: the real-model example that compose uses (Kubernetes' cluster.yaml and
tier.yaml are checked against it in test_k8s.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from service.cli import main
from service.config import load_config, parse_config
from service.errors import ConfigError
from tests.deploy.conftest import EXAMPLE_CONFIG, POSTGRES_PORT


def test_check_config_passes(
    adapters_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real `ensemble-gateway check-config`, adapters included (stand-ins in PEFT format)."""
    monkeypatch.setenv("ADAPTERS_DIR", str(adapters_dir))
    monkeypatch.setenv("STORE_PASSWORD", "from-the-environment")
    assert main(["check-config", str(EXAMPLE_CONFIG)]) == 0, capsys.readouterr().err
    assert "ok: 6 members" in capsys.readouterr().out


def test_real_models_and_no_launched_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTERS_DIR", raising=False)
    monkeypatch.setenv("STORE_PASSWORD", "from-the-environment")
    config = load_config(EXAMPLE_CONFIG)
    assert config.servers == [], "in compose the members are servers of their own"
    assert {config.local_ranker(n).checkpoint for n in config.rankers} == {"llm-blender/PairRM-hf"}
    assert {getattr(f, "checkpoint", None) for f in config.fusers.values()} == {"llm-blender/gen_fuser_3b"}
    assert all(config.local_ranker(n).device.startswith("cuda") for n in config.rankers)
    assert {m.kind for m in config.members} == {"model", "lora", "soft_prompt", "bottleneck"}
    # Adapters are where the containers mount them.
    assert all(m.adapter.startswith("/adapters/") for m in config.members if m.adapter)


def test_store_is_postgresql_with_the_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several gateway replicas share one PostgreSQL (the `postgres` service in compose and in
    Kubernetes); the file holds no password, only `${STORE_PASSWORD}`."""
    from service.store.store import store_url

    monkeypatch.setenv("STORE_PASSWORD", "s3cret-hex")
    config = parse_config(EXAMPLE_CONFIG.read_text(), str(EXAMPLE_CONFIG))
    assert config.store is not None and config.store.url is not None
    url = make_url(config.store.url)
    assert url.drivername == "postgresql"
    assert (url.host, url.port, url.password) == ("postgres", POSTGRES_PORT, "s3cret-hex")
    assert store_url(config.store, config.cache_root()).drivername == "postgresql+asyncpg"
    assert all(e.store for e in config.ensembles.values()), "every example ensemble is recorded"


def test_store_password_has_no_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without STORE_PASSWORD the gateway refuses the file, rather than connecting with none."""
    monkeypatch.delenv("STORE_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="STORE_PASSWORD"):
        parse_config(EXAMPLE_CONFIG.read_text(), str(EXAMPLE_CONFIG))
