"""The model tier as its own process (`ensemble-gateway serve-models`) serving the tiny random and
the trained PairRM and GenFuser, and a gateway process whose rankers and fusers are `endpoint`s
on it, its members on the random-weight ensemble's vLLM servers. That gateway runs from a fresh
venv with the package installed as deploy/Dockerfile installs it (`pip install .`: no torch, no
transformers). Its answers are what the same models give in this process for the same candidates
(scores equal, fused texts identical, streamed too); the tier killed → every request still
answered, degraded, saying why."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.config import FuserConfig, RankerConfig
from service.models.fusers.genfuser import GenFuser
from service.models.rankers.pairrm import PairRMRanker
from tests.integration.conftest import ROOT, Gateway, serve
from tests.load import tier_process

pytestmark = pytest.mark.integration

TIER_KEY = "tier-test-key"
PROMPTS = ["Tell me about rivers.", "What is 2 plus 3?", "Name a capital city.", "Sort the letters of dcba."]


@pytest.fixture(scope="module")
def checkpoints(tiny_models: Path, trained_models: Path) -> dict[str, dict[str, Path]]:
    return {
        "random": {"pairrm": tiny_models / "pairrm", "genfuser": tiny_models / "genfuser"},
        "trained": {"pairrm": trained_models / "pairrm", "genfuser": trained_models / "genfuser"},
    }


@pytest.fixture(scope="module")
def tier(checkpoints: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("tier")
    config = {
        "rankers": {k: {"checkpoint": str(v["pairrm"]), "threads": 1} for k, v in checkpoints.items()},
        "fusers": {k: {"checkpoint": str(v["genfuser"]), "threads": 1} for k, v in checkpoints.items()},
        "api_keys_env": "TIER_KEYS",
    }
    with tier_process(config, tmp, env={"TIER_KEYS": TIER_KEY}) as tier:
        yield {"url": tier.url, "proc": tier.proc, "log": tier.log}


@pytest.fixture(scope="module")
def torchless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding the gateway as its image has it: `pip install .`, the core dependencies only."""
    venv = tmp_path_factory.mktemp("torchless") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run([*pip, str(ROOT)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for module in ("torch", "transformers", "llm_blender", "tokenizers"):
        found = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True)
        assert found.returncode != 0, f"{module} is importable in the gateway's install"
    return venv


def test_the_torchless_gateway_refuses_a_model_in_process(torchless: Path, tmp_path: Path) -> None:
    config = tmp_path / "local.yaml"
    config.write_text(
        'members: [{name: a, endpoint: "http://127.0.0.1:9/v1", model: m}]\n'
        "rankers: {pairrm: {checkpoint: llm-blender/PairRM-hf}}\n"
        "ensembles: {main: {members: [a], ranker: pairrm}}\n"
    )
    done = subprocess.run(
        [str(torchless / "bin" / "ensemble-gateway"), "check-config", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 2, done
    assert "rankers.pairrm: runs in this process, which lacks torch and transformers" in done.stderr


@pytest.fixture(scope="module")
def remote(
    gateway: Gateway, tier: dict[str, Any], torchless: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway without models of its own, from the torchless venv: members on the random
    ensemble's base-b server, the rankers and fusers on the tier."""
    tmp = tmp_path_factory.mktemp("remote-gateway")
    endpoint = gateway.server_urls["base-b"]
    member = {"endpoint": endpoint, "model": "tiny-llama-b", "timeout_s": 30}
    members = [
        {**member, "name": "greedy", "sampling": {"max_tokens": 12, "temperature": 0}},
        {**member, "name": "short", "sampling": {"max_tokens": 5, "temperature": 0}},
        {**member, "name": "warm", "sampling": {"max_tokens": 12, "temperature": 0.9, "seed": 5}},
    ]
    on_tier = {"endpoint": tier["url"], "api_key_env": "TIER_KEY", "timeout_s": 60}
    ensemble = {
        "members": ["greedy", "short", "warm"],
        "fuse_top_k": 2,
        "fusion": "always",
        "deadline_s": 90,
        "quorum": 3,
    }
    config = {
        "servers": [],
        "members": members,
        "rankers": {k: {**on_tier, "model": k} for k in ("random", "trained")},
        "fusers": {k: {**on_tier, "model": k} for k in ("random", "trained")},
        "ensembles": {k: {**ensemble, "ranker": k, "fuser": k} for k in ("random", "trained")},
        "resilience": {"breaker": {"failures": 2, "cooldown_s": 60}},
    }
    path = tmp / "remote.yaml"
    path.write_text(yaml.safe_dump(config))
    with serve(path, tmp, env={"TIER_KEY": TIER_KEY}, exe=str(torchless / "bin" / "ensemble-gateway")) as gw:
        yield gw


def test_remote_answers_are_the_in_process_models_answers(
    remote: Gateway, tier: dict[str, Any], checkpoints: dict[str, dict[str, Path]]
) -> None:
    for kind, paths in checkpoints.items():
        ranker = PairRMRanker("local", RankerConfig(checkpoint=str(paths["pairrm"]), threads=1))
        fuser = GenFuser("local", FuserConfig(checkpoint=str(paths["genfuser"]), threads=1))
        try:
            for prompt in PROMPTS:
                r = httpx.post(f"{remote.url}/generate", json={"prompt": prompt, "ensemble": kind,
                                                               "return_candidates": True}, timeout=120)  # fmt: skip
                assert r.status_code == 200, r.text
                body = r.json()
                assert not body["degraded"], body["degraded_reasons"]
                members = [c["member"] for c in body["candidates"]]
                texts = {c["member"]: c["text"] for c in body["candidates"]}
                order = ["greedy", "short", "warm"]  # the ranker saw them in member order
                ranking = _run(ranker.rank(prompt, [texts[m] for m in order]))
                local_scores = dict(zip(order, ranking.scores, strict=True))
                assert {c["member"]: c["score"] for c in body["candidates"]} == local_scores  # exact
                assert body["fused"] and members[:2] == body["selected"]
                fused = _run(fuser.fuse("", prompt, [texts[m] for m in body["selected"]]))
                assert body["output"] == fused, (kind, prompt)
                # Streamed through the OpenAI API: the same text in pieces.
                chat = {"model": kind, "stream": True, "messages": [{"role": "user", "content": prompt}]}
                with httpx.stream("POST", f"{remote.url}/v1/chat/completions", json=chat, timeout=120) as s:
                    events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
                streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
                assert streamed.strip() != ""
        finally:
            ranker.close()
            fuser.close()
    metrics = httpx.get(f"{tier['url']}/metrics", timeout=30).text
    assert 'tier_requests_total{model="trained",op="rank",status="200"}' in metrics


def test_the_tier_killed_degrades_answers_and_loses_none(remote: Gateway, tier: dict[str, Any]) -> None:
    tier["proc"].send_signal(signal.SIGKILL)
    tier["proc"].wait(timeout=30)
    for i, prompt in enumerate(PROMPTS * 2):
        r = httpx.post(f"{remote.url}/generate", json={"prompt": prompt, "ensemble": "trained"}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["degraded"] and not body["fused"]
        reason = " ".join(body["degraded_reasons"])
        assert "ranker_failed" in reason and ("connect" in reason or "circuit_open" in reason), reason
        if i >= 2:
            assert "circuit_open" in reason  # after two failures the tier is skipped at once
    ready = httpx.get(f"{remote.url}/ready", timeout=30)
    assert ready.status_code == 200  # the gateway still serves; its members are up


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)
