"""The OpenAI-compatible surface, streaming and hot reload, against the real gateway process."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import ADMIN_KEY, Gateway

pytestmark = pytest.mark.integration

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the moon."}]


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_models_and_chat_with_the_official_client(gateway: Gateway) -> None:
    oa = client(gateway)
    assert {m.id for m in oa.models.list()} == set(gateway.config.ensembles)
    out = oa.chat.completions.create(model="demo", messages=MSG, temperature=0)
    assert out.object == "chat.completion" and out.model == "demo"
    assert out.choices[0].message.content and out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens > 0


@pytest.mark.parametrize("ensemble", ["demo", "llm-fused", "rank-only"])
def test_streamed_answer_equals_the_plain_one(gateway: Gateway, ensemble: str) -> None:
    """Temperature 0 makes members repeatable, so the streamed and the plain fused answers match."""
    oa = client(gateway)
    plain = oa.chat.completions.create(model=ensemble, messages=MSG, temperature=0)
    chunks = list(
        oa.chat.completions.create(
            model=ensemble,
            messages=MSG,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content
    if ensemble != "rank-only":
        assert sum(1 for p in pieces if p) > 1, "the fused answer arrives in pieces"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_text_completions_plain_and_streaming(gateway: Gateway) -> None:
    oa = client(gateway)
    plain = oa.completions.create(model="demo", prompt="Once upon a time", temperature=0)
    streamed = oa.completions.create(model="demo", prompt="Once upon a time", temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_unsupported_field_with_the_official_client(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).chat.completions.create(
            model="demo", messages=MSG, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    assert "tools" in str(e.value)


def test_generate_stream_has_the_evidence(gateway: Gateway) -> None:
    with httpx.stream(
        "POST", f"{gateway.url}/generate", json={"prompt": "hi", "stream": True, "return_candidates": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    import json

    result = json.loads(data[-2])
    assert result["object"] == "ensemble.result" and len(result["candidates"]) == 5
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-2])
    assert text == result["output"]


def _config_with(gw: Gateway, edit: Any) -> str:
    data = yaml.safe_load(gw.config_text)
    edit(data)
    return yaml.safe_dump(data)


def _reload_during_traffic(gateway: Gateway, edits: list[Any], workers: int, check: Any) -> tuple[list[Any], list[int]]:
    """Apply each edit and reload while ``workers`` clients send requests; restore the file after."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                statuses.append(
                    c.post(f"{gateway.url}/generate", json={"prompt": "q", "ensemble": "rank-only"}).status_code
                )

    threads = [threading.Thread(target=traffic) for _ in range(workers)]
    for t in threads:
        t.start()
    results = []
    try:
        for edit in edits:
            gateway.config_path.write_text(_config_with(gateway, edit))
            r = httpx.post(f"{gateway.url}/admin/reload", headers=admin, timeout=600)
            results.append((r.status_code, r.json()))
            check(edit)
            time.sleep(1.0)  # let requests run on each configuration
    finally:
        stop.set()
        for t in threads:
            t.join()
        gateway.config_path.write_text(gateway.config_text)
    return results, statuses


def _listed(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/models", timeout=10).json()["data"]]


def test_reload_under_load_adds_changes_and_removes_members_and_loras(
    gateway: Gateway, tiny_models: Path, scratch_lora_server: str
) -> None:
    base_a = scratch_lora_server

    def add_lora(d: dict[str, Any]) -> None:
        d["members"].append(
            {
                "name": "late-lora",
                "kind": "lora",
                "endpoint": scratch_lora_server,
                "adapter": str(tiny_models / "llama-a-lora-1"),
                "sampling": {"max_tokens": 16},
            }
        )
        d["ensembles"]["late"] = {"members": ["late-lora", "llama-b"], "ranker": "pairrm", "fuse_top_k": 1}

    def change_sampling(d: dict[str, Any]) -> None:
        add_lora(d)
        d["members"][0]["sampling"]["max_tokens"] = 12

    def restore(d: dict[str, Any]) -> None:
        pass

    def check(edit: Any) -> None:
        if edit is add_lora:
            assert "late-lora" in _listed(base_a)
            late = httpx.post(f"{gateway.url}/generate", json={"prompt": "q", "ensemble": "late"}, timeout=120)
            assert late.status_code == 200 and late.json()["failed_members"] == []

    edits = [add_lora, change_sampling, restore, add_lora, restore]
    results, statuses = _reload_during_traffic(gateway, edits, workers=3, check=check)
    assert [code for code, _ in results] == [200] * len(edits), results
    assert results[0][1]["changes"]["members_added"] == ["late-lora"]
    assert results[1][1]["changes"]["members_rebuilt"] == ["llama-a"]
    assert results[2][1]["changes"]["members_removed"] == ["late-lora"]
    assert results[2][1]["changes"]["rankers_loaded"] == [] and results[2][1]["changes"]["fusers_loaded"] == []
    assert len(statuses) >= 3 and set(statuses) == {200}, statuses
    deadline = time.monotonic() + 120
    while "late-lora" in _listed(base_a):
        assert time.monotonic() < deadline, "the removed LoRA member's adapter was never unloaded"
        time.sleep(1)


def test_reload_adds_and_retires_a_server(gateway: Gateway) -> None:
    """Single-node mode: a server added by a reload is started before the swap, and one removed
    is stopped after the requests on the old configuration are done."""

    def add_server(d: dict[str, Any]) -> None:
        d["servers"].append({**d["servers"][1], "name": "base-c", "port": None})
        d["members"].append(
            {"name": "llama-c", "server": "base-c", "model": "tiny-llama-b", "sampling": {"max_tokens": 8}}
        )
        d["ensembles"]["with-c"] = {"members": ["llama-c", "llama-b"], "ranker": "pairrm", "fuse_top_k": 1}

    seen: dict[str, Any] = {}

    def check(edit: Any) -> None:
        if edit is add_server:
            body = httpx.post(
                f"{gateway.url}/generate",
                json={"prompt": "q", "ensemble": "with-c", "return_candidates": True},
                timeout=120,
            ).json()
            assert {c["member"] for c in body["candidates"]} == {"llama-c", "llama-b"}
            seen["ready"] = httpx.get(f"{gateway.url}/ready", timeout=10).json()

    results, statuses = _reload_during_traffic(gateway, [add_server, lambda d: None], workers=1, check=check)
    assert [code for code, _ in results] == [200, 200], results
    assert results[0][1]["changes"]["servers_started"] == ["base-c"]
    assert results[1][1]["changes"]["servers_retired"] == ["base-c"]
    assert seen["ready"]["members"]["llama-c"]["up"] is True
    assert statuses and set(statuses) == {200}, statuses


def test_bad_reload_keeps_serving_and_sighup_reloads(gateway: Gateway) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        gateway.config_path.write_text(gateway.config_text.replace("fuse_top_k: 3", "fuse_top_k: 0"))
        r = httpx.post(f"{gateway.url}/admin/reload", headers=admin, timeout=60)
        assert r.status_code == 400 and "fuse_top_k" in r.json()["error"]["message"]
        assert httpx.post(f"{gateway.url}/generate", json={"prompt": "q"}, timeout=120).status_code == 200

        gateway.config_path.write_text(
            _config_with(gateway, lambda d: d["ensembles"].update({"via-hup": {"members": ["llama-b"]}}))
        )
        os.kill(gateway.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "via-hup" not in [m["id"] for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.5)
    finally:
        gateway.config_path.write_text(gateway.config_text)
        assert httpx.post(f"{gateway.url}/admin/reload", headers=admin, timeout=120).status_code == 200
