"""Tests that run in the adapter server's environment (.venv-adapters: transformers 4.57 and the
`adapters` library): `make test` runs them with that interpreter. They build their adapters over
the tiny trained base A (TINY_MODELS, made by `make models`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

TINY = Path(os.environ.get("TINY_MODELS", Path(__file__).resolve().parents[2] / ".cache" / "tiny-models"))
BASE = TINY / "trained" / "base-a"


@pytest.fixture(scope="session")
def base_dir() -> Path:
    if not (BASE / "config.json").exists():
        pytest.fail(f"{BASE} is missing: run `make models` first")
    return BASE


def make_adapter(base: Path, out: Path, kind: str, seed: int) -> Path:
    """An adapter of ``kind`` (bottleneck or prefix) over ``base``, with seeded random weights (a
    fresh bottleneck adapter is the identity: its up-projection starts at zero), saved by
    ``save_adapter``."""
    import adapters
    import torch
    from adapters import BnConfig, PrefixTuningConfig
    from transformers import AutoModelForCausalLM

    from service.adapterserver.patches import ATTENTION, load_config

    model: Any = AutoModelForCausalLM.from_pretrained(base, config=load_config(base), attn_implementation=ATTENTION)
    adapters.init(model)
    config = (
        BnConfig(mh_adapter=True, output_adapter=True, reduction_factor=16, non_linearity="gelu")
        if kind == "bottleneck"
        else PrefixTuningConfig(prefix_length=8, flat=True)
    )
    model.add_adapter(kind, config=config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{kind}." in name or name.endswith(f".{kind}"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_adapter(str(out), kind)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        kind: make_adapter(base_dir, root / kind, kind, seed=i + 1) for i, kind in enumerate(["bottleneck", "prefix"])
    }


@pytest.fixture
def theta_base(base_dir: Path, tmp_path: Path) -> Path:
    """Base A with RoPE's base moved to 500000, where transformers 5 writes it (rope_parameters)."""
    import json

    out = tmp_path / "base-theta"
    shutil.copytree(base_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    config.pop("rope_theta", None)
    (out / "config.json").write_text(json.dumps(config))
    return out
