"""The adapter server on base A with a bottleneck and a prefix-tuning adapter: its greedy answers equal
the `adapters` library's own generate (chat template applied), differ from the base's, do not mix in a
batch, and bad adapters are refused with the reason."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.adapterserver.engine import AdapterError, Engine, adapter_architecture
from service.adapterserver.patches import ATTENTION, load_config, load_tokenizer, patch_llama_cache

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["reverse abcde", "sort the letters: dcba", "What is the capital of Veltoria?", "What is 12 plus 30?"]


@pytest.fixture(scope="module")
def client(base_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from service.adapterserver.app import create_app

    engine = Engine(str(base_dir), {"bn": str(adapter_dirs["bottleneck"]), "pt": str(adapter_dirs["prefix"])})
    with TestClient(create_app(engine, "base-a")) as c:
        yield c
    engine.close()


def _library_answer(base: Path, adapter: Path | None, prompt: str, max_new_tokens: int = 16) -> str:
    """The adapters library's own generate, greedy, with the chat template applied."""
    import adapters
    import torch
    from transformers import AutoModelForCausalLM

    patch_llama_cache()
    model: Any = AutoModelForCausalLM.from_pretrained(base, config=load_config(base), attn_implementation=ATTENTION)
    model.eval()
    tok = load_tokenizer(base)
    if adapter is not None:
        adapters.init(model)
        model.load_adapter(str(adapter), load_as="x", set_active=True)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return str(tok.decode(new, skip_special_tokens=True))


def _chat(client: Any, model: str, prompt: str, **extra: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
    return client.post("/v1/chat/completions", json=body | extra)


@pytest.mark.parametrize(("member", "kind"), [("bn", "bottleneck"), ("pt", "prefix")])
def test_greedy_answers_equal_the_librarys_generate(
    client: Any, base_dir: Path, adapter_dirs: dict[str, Path], member: str, kind: str
) -> None:
    differs = 0
    for prompt in PROMPTS:
        r = _chat(client, member, prompt)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text == _library_answer(base_dir, adapter_dirs[kind], prompt)
        differs += text != _chat(client, "base-a", prompt).json()["choices"][0]["message"]["content"]
    assert differs >= 3, "the adapter changes the base's answers"
    assert _chat(client, "base-a", PROMPTS[0]).json()["choices"][0]["message"]["content"] == _library_answer(
        base_dir, None, PROMPTS[0]
    )


def test_concurrent_requests_to_two_adapters_get_their_own_answers(client: Any) -> None:
    want = {
        (m, p): _chat(client, m, p).json()["choices"][0]["message"]["content"] for m in ("bn", "pt") for p in PROMPTS
    }
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {key: pool.submit(_chat, client, *key) for key in list(want) * 2}
        got = {key: f.result().json()["choices"][0]["message"]["content"] for key, f in futures.items()}
    assert got == want


def test_stream_joins_to_the_answer(client: Any) -> None:
    plain = _chat(client, "bn", PROMPTS[0]).json()["choices"][0]["message"]["content"]
    r = _chat(client, "bn", PROMPTS[0], stream=True)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == plain
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_list_adapters_with_their_base(client: Any) -> None:
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["bn"]["parent"] == "base-a" and data["pt"]["parent"] == "base-a"
    assert (data["bn"]["adapter_type"], data["pt"]["adapter_type"]) == ("bottleneck", "prefix_tuning")


def test_errors_are_openai_shaped(client: Any) -> None:
    r = _chat(client, "nope", "x")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/chat/completions", json={"model": "bn", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _chat(client, "bn", "x", max_tokens=0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_bad_adapters_are_refused_with_the_reason(
    base_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import adapters
    from adapters import LoRAConfig
    from transformers import AutoModelForCausalLM

    config = load_config(base_dir)
    with pytest.raises(AdapterError, match="not an adapters-library adapter"):
        adapter_architecture(tmp_path, config)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, config=config)
    adapters.init(model)
    model.add_adapter("lo", config=LoRAConfig())
    model.save_adapter(str(tmp_path / "lo"), "lo")
    with pytest.raises(AdapterError, match="supported: bottleneck, prefix_tuning"):
        adapter_architecture(tmp_path / "lo", config)
    other = load_config(base_dir.parent / "base-b")
    other.hidden_size = config.hidden_size * 2
    with pytest.raises(AdapterError, match="hidden_size"):
        adapter_architecture(adapter_dirs["bottleneck"], other)
    config.name_or_path = str(base_dir.parent / "base-b")
    with pytest.raises(AdapterError, match="trained over base"):
        adapter_architecture(adapter_dirs["bottleneck"], config)


def test_runs_on_its_own_and_refuses_a_bad_adapter_at_start(
    base_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import socket

    bad = subprocess.run(
        [sys.executable, "-m", "service.adapterserver", "--model", str(base_dir), "--adapter", f"x={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2 and "not an adapters-library adapter" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.adapterserver",
            "--model",
            str(base_dir),
            "--served-model-name",
            "base-a",
            "--adapter",
            f"bn={adapter_dirs['bottleneck']}",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            assert {m["id"] for m in json.loads(r.read())["data"]} == {"base-a", "bn"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_key_guards_the_api_but_not_health(base_dir: Path) -> None:
    """With ``api_key`` (``--api-key`` or ``VLLM_API_KEY``), as vLLM: /v1 wants the key, /health does not."""
    from fastapi.testclient import TestClient

    from service.adapterserver.app import create_app

    engine = Engine(str(base_dir), {})
    try:
        with TestClient(create_app(engine, "base-a", api_key="k1")) as c:
            refused = c.get("/v1/models")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 401
            assert c.post("/v1/chat/completions", json={}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
            assert c.get("/health").status_code == 200
    finally:
        engine.close()
