"""deploy/config/ensemble.yaml: the real-model example that compose and Kubernetes both use."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from service.config import load_config
from tests.deploy.conftest import EXAMPLE_CONFIG


@pytest.mark.parametrize(
    "embeds_url",
    [None, "http://vllm-llama-embeds:8000/v1"],
    ids=["compose", "kubernetes"],
)
def test_check_config_passes(
    embeds_url: str | None, adapters_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real `ensemble-gateway check-config`, adapters included (stand-ins in PEFT format)."""
    monkeypatch.setenv("ADAPTERS_DIR", str(adapters_dir))
    if embeds_url is None:
        monkeypatch.delenv("LLAMA_EMBEDS_URL", raising=False)
    else:
        monkeypatch.setenv("LLAMA_EMBEDS_URL", embeds_url)
    assert main(["check-config", str(EXAMPLE_CONFIG)]) == 0, capsys.readouterr().err
    assert "ok: 6 members" in capsys.readouterr().out


def test_real_models_and_no_launched_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTERS_DIR", raising=False)
    config = load_config(EXAMPLE_CONFIG)
    assert config.servers == [], "in compose and Kubernetes the members are servers of their own"
    assert {r.checkpoint for r in config.rankers.values()} == {"llm-blender/PairRM-hf"}
    assert {getattr(f, "checkpoint", None) for f in config.fusers.values()} == {"llm-blender/gen_fuser_3b"}
    assert all(r.device.startswith("cuda") for r in config.rankers.values())
    assert {m.kind for m in config.members} == {"model", "lora", "soft_prompt", "bottleneck"}
    # Adapters are where the containers mount them.
    assert all(m.adapter.startswith("/adapters/") for m in config.members if m.adapter)
