"""Bottleneck and prefix-tuning members (the `adapters` library) through the gateway: the gateway starts
the adapter server from .venv-adapters as it starts vLLM, each member's greedy answer equals the
library's own generate on the same chat-templated prompt (run in that environment), the answers differ
from base A's, concurrent requests do not mix adapters, the server comes back after SIGKILL, and bad
adapters are refused with the member named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from service.config import parse_config
from service.errors import ConfigError
from service.members.checks import check_members
from service.ops.launcher import adapters_python
from tests.integration.conftest import ADMIN_KEY, Gateway, serve

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["reverse abcde", "sort the letters: dcba", "What is the capital of Veltoria?", "What is 12 plus 30?"]
ADAPTER_KEY = "adapter-server-test-key"

MAKE = """
import sys
from pathlib import Path
from tests.adapters.conftest import make_adapter
base, out = Path(sys.argv[1]), Path(sys.argv[2])
make_adapter(base, out / "bottleneck", "bottleneck", seed=1)
make_adapter(base, out / "prefix", "prefix", seed=2)
"""

REFERENCE = """
import json, sys, torch, adapters
from transformers import AutoModelForCausalLM
from service.adapterserver.patches import ATTENTION, load_config, load_tokenizer, patch_llama_cache
base, adapter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
patch_llama_cache()
model = AutoModelForCausalLM.from_pretrained(base, config=load_config(base), attn_implementation=ATTENTION).eval()
tok = load_tokenizer(base)
if adapter != "-":
    adapters.init(model)
    model.load_adapter(adapter, load_as="x", set_active=True)
out = []
for p in prompts:
    ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    new = gen[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    out.append(tok.decode(new, skip_special_tokens=True))
print(json.dumps(out))
"""


def _in_adapters_env(code: str, *args: str) -> str:
    python = adapters_python()
    if not Path(python).exists():
        pytest.fail(f"{python} is missing: `make adapters-env` builds it (make test does)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def adapter_dirs(trained_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("adapters")
    _in_adapters_env(MAKE, str(trained_models / "base-a"), str(out))
    return {"bottleneck": out / "bottleneck", "prefix": out / "prefix"}


def _config(trained: Path, dirs: dict[str, Path]) -> dict[str, Any]:
    greedy = {"max_tokens": 16, "temperature": 0.0}
    return {
        "servers": [
            {
                "name": "adapters",
                "engine": "adapters",
                "model": str(trained / "base-a"),
                "served_model_names": ["base-a"],
                "args": ["--max-batch", "8"],
                "startup_timeout_s": 300,
                "env": {"VLLM_API_KEY": ADAPTER_KEY},  # the server wants a key, as vLLM with --api-key
            }
        ],
        "members": [
            {
                "name": "bn",
                "kind": "bottleneck",
                "server": "adapters",
                "adapter": str(dirs["bottleneck"]),
                "sampling": greedy,
                "api_key_env": "ADAPTER_KEY",
            },
            {
                "name": "pt",
                "kind": "prefix",
                "server": "adapters",
                "adapter": str(dirs["prefix"]),
                "sampling": greedy,
                "api_key_env": "ADAPTER_KEY",
            },
            {
                "name": "base",
                "kind": "model",
                "server": "adapters",
                "model": "base-a",
                "sampling": greedy,
                "api_key_env": "ADAPTER_KEY",
            },
        ],
        "ensembles": {
            "adapters": {"members": ["bn", "pt", "base"], "min_candidates": 3},
            **{m: {"members": [m]} for m in ("bn", "pt", "base")},
        },
    }


@pytest.fixture(scope="module")
def gw(
    trained_models: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("adapter-gateway")
    path = tmp / "adapters.yaml"
    path.write_text(yaml.safe_dump(_config(trained_models, adapter_dirs)))
    with serve(path, tmp, env={"ADAPTER_KEY": ADAPTER_KEY}) as g:
        yield g


def test_the_adapter_server_wants_its_key(gw: Gateway) -> None:
    """The members send the key (api_key_env); a caller without it is refused in the OpenAI shape."""
    server = gw.server_urls["adapters"]
    refused = httpx.get(f"{server}/models", timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{server}/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    ok = httpx.get(f"{server}/models", headers={"Authorization": f"Bearer {ADAPTER_KEY}"}, timeout=30)
    assert ok.status_code == 200 and {m["id"] for m in ok.json()["data"]} >= {"base-a"}
    assert httpx.get(server.removesuffix("/v1") + "/health", timeout=30).status_code == 200


def _answers(gw: Gateway, ensemble: str, prompts: list[str]) -> list[str]:
    out = []
    for p in prompts:
        r = httpx.post(f"{gw.url}/generate", json={"prompt": p, "ensemble": ensemble}, timeout=120)
        assert r.status_code == 200, r.text
        out.append(r.json()["output"])
    return out


def test_members_answer_as_the_librarys_generate(
    gw: Gateway, trained_models: Path, adapter_dirs: dict[str, Path]
) -> None:
    base = str(trained_models / "base-a")
    want_base = json.loads(_in_adapters_env(REFERENCE, base, "-", json.dumps(PROMPTS)))
    assert _answers(gw, "base", PROMPTS) == want_base
    for member, kind in (("bn", "bottleneck"), ("pt", "prefix")):
        want = json.loads(_in_adapters_env(REFERENCE, base, str(adapter_dirs[kind]), json.dumps(PROMPTS)))
        got = _answers(gw, member, PROMPTS)
        assert got == want, member
        assert sum(a != b for a, b in zip(got, want_base, strict=True)) >= 3, f"{member} changes base A's answers"


def test_concurrent_requests_keep_their_adapters(gw: Gateway) -> None:
    alone = {(m, p): _answers(gw, m, [p])[0] for m in ("bn", "pt", "base") for p in PROMPTS}
    with ThreadPoolExecutor(12) as pool:
        futures = {key: pool.submit(_answers, gw, key[0], [key[1]]) for key in alone}
        assert {key: f.result()[0] for key, f in futures.items()} == alone
    r = httpx.post(
        f"{gw.url}/generate",
        json={"prompt": PROMPTS[0], "ensemble": "adapters", "return_candidates": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert {c["member"]: c["text"] for c in r.json()["candidates"]} == {
        m: alone[(m, PROMPTS[0])] for m in ("bn", "pt", "base")
    }


def test_the_server_comes_back_after_sigkill(gw: Gateway) -> None:
    gateway = psutil.Process(gw.pid)
    servers = [p for p in gateway.children(recursive=True) if "service.adapterserver" in " ".join(p.cmdline())]
    assert len(servers) == 1
    os.kill(servers[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while True:
        try:
            r = httpx.post(f"{gw.url}/generate", json={"prompt": PROMPTS[0], "ensemble": "bn"}, timeout=30)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the adapter server did not come back"
        time.sleep(2)
    again = [p for p in gateway.children(recursive=True) if "service.adapterserver" in " ".join(p.cmdline())]
    assert len(again) == 1 and again[0].pid != servers[0].pid


def test_bad_adapters_are_refused_naming_the_member(
    trained_models: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    def check(**member: Any) -> str:
        cfg = _config(trained_models, adapter_dirs)
        cfg["members"][0].update(member)
        with pytest.raises(ConfigError) as info:
            check_members(parse_config(yaml.safe_dump(cfg)))
        return str(info.value)

    assert "members.bn.adapter" in check(adapter=str(tmp_path)) and "no adapter" in check(adapter=str(tmp_path))
    assert "needs a bottleneck adapter" in check(adapter=str(adapter_dirs["prefix"]))
    peft = trained_models / "lora-sort"
    assert "not an adapters-library adapter" in check(adapter=str(peft))
    wide = tmp_path / "wide"
    wide.mkdir()
    meta = json.loads((adapter_dirs["bottleneck"] / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**meta, "hidden_size": 999}))
    assert "hidden_size 999" in check(adapter=str(wide))
    cfg = _config(trained_models, adapter_dirs)
    cfg["servers"][0]["engine"] = "vllm"
    with pytest.raises(ConfigError, match="needs an `engine: adapters` server"):
        parse_config(yaml.safe_dump(cfg))


def _adapter_servers(gw: Gateway) -> list[psutil.Process]:
    procs = psutil.Process(gw.pid).children(recursive=True)
    return [p for p in procs if "service.adapterserver" in " ".join(p.cmdline())]


def test_reload_changes_the_servers_adapters_and_a_bad_one_keeps_the_old(
    gw: Gateway, adapter_dirs: dict[str, Path]
) -> None:
    """Removing a member reloads its adapter server with the adapters left (a new instance, started
    before the old one stops); a bad adapter on reload is refused naming the member, and the running
    configuration serves on."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    data = yaml.safe_load(gw.config_text)
    before = _answers(gw, "bn", PROMPTS[:2])
    try:
        data["members"] = [m for m in data["members"] if m["name"] != "pt"]
        data["ensembles"] = {k: v for k, v in data["ensembles"].items() if "pt" not in v["members"]}
        data["ensembles"]["adapters"] = {"members": ["bn", "base"], "min_candidates": 2}
        gw.config_path.write_text(yaml.safe_dump(data))
        r = httpx.post(f"{gw.url}/admin/reload", headers=admin, timeout=600)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120  # the old instance stops once the swap has drained it
        while len(servers := _adapter_servers(gw)) != 1:
            assert time.monotonic() < deadline, [p.cmdline() for p in servers]
            time.sleep(1)
        cmd = " ".join(servers[0].cmdline())
        assert "bn=" in cmd and "pt=" not in cmd
        assert _answers(gw, "bn", PROMPTS[:2]) == before
        assert httpx.post(f"{gw.url}/generate", json={"prompt": "x", "ensemble": "pt"}, timeout=30).status_code == 404
        data["members"][0]["adapter"] = str(adapter_dirs["prefix"])  # a prefix adapter for a bottleneck member
        gw.config_path.write_text(yaml.safe_dump(data))
        r = httpx.post(f"{gw.url}/admin/reload", headers=admin, timeout=120)
        assert r.status_code == 400 and "members.bn.adapter" in r.json()["error"]["message"], r.text
        assert _answers(gw, "bn", PROMPTS[:2]) == before
    finally:
        gw.config_path.write_text(gw.config_text)
        assert httpx.post(f"{gw.url}/admin/reload", headers=admin, timeout=600).status_code == 200
