"""The training recipes, small (a few steps each): every checkpoint is written in the format the
gateway serves, and a second run with the same recipe skips every step."""

from __future__ import annotations

import json
from pathlib import Path

from service.quality.recipe import default_recipe
from service.quality.train import read_manifest, train_all


def test_small_training_writes_every_checkpoint_and_reruns_nothing(tmp_path: Path) -> None:
    report = train_all(tmp_path, small=True)
    recipe = default_recipe()
    steps = [*recipe.members, *recipe.variants, "candidates", "pairrm", "genfuser", "router"]
    assert set(report.seconds) == set(steps) and report.skipped == []
    for name, member in [*recipe.members.items(), *recipe.variants.items()]:
        # adapters (LoRA, prompt tuning) write an adapter; bases and full fine-tunes a whole model
        kind = "adapter_config.json" if hasattr(member, "kind") else "config.json"
        assert (tmp_path / name / kind).exists(), name
    assert json.loads((tmp_path / "pairrm" / "config.json").read_text())["model_type"] == "deberta-v2"
    assert json.loads((tmp_path / "genfuser" / "config.json").read_text())["model_type"] == "t5"
    assert json.loads((tmp_path / "router" / "router.json").read_text())["members"] == sorted(recipe.members)
    manifest = read_manifest(tmp_path)
    assert manifest is not None and manifest["small"] is True
    assert set(manifest["stamps"]) == set(steps) == set(manifest["seconds"])  # type: ignore[call-overload]
    again = train_all(tmp_path, small=True)
    assert sorted(again.skipped) == sorted(steps) and again.seconds == {}
    # The seconds of the run that built each step survive a run that skips it.
    assert read_manifest(tmp_path) == manifest
