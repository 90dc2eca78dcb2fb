"""``python -m bench.tier``: the model tier measured on this machine (docs/PERFORMANCE.md, "The model
tier"; docs/RELIABILITY.md).

Three stub members (tests.stub_server, 20 ms) and the trained PairRM and GenFuser. One gateway loads
them itself; two gateway replicas without models call one `ensemble-gateway serve-models` process.
The same prompts go to both set-ups: the answers must be identical (output and every score). Then
each takes closed-loop load (the replicas split the clients) and requests at one at a time: requests/s
and p50 side by side. Last, the tier is killed under load: every request must still be answered,
degraded (unranked, unfused) once the tier is gone, none lost. Writes ``bench/results/tier.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, machine
from tests.load import Result, drive, gateway_process, stub_server, tier_process

logger = logging.getLogger("bench.tier")
TIER_KEY = "bench-tier-key"


def gateway_config(stub: str, models: dict[str, Any]) -> dict[str, Any]:
    members = [
        {"name": f"m{i}", "endpoint": stub, "model": "ok", "timeout_s": 10, "sampling": {"max_tokens": 16}}
        for i in range(3)
    ]
    ensemble: dict[str, Any] = {"members": [m["name"] for m in members], "ranker": "pairrm", "fuser": "genfuser"}
    ensemble.update({"fusion": "always", "fuse_top_k": 2, "deadline_s": 30, "quorum": 3})
    return {
        "members": members,
        **models,
        "ensembles": {"main": ensemble},
        "resilience": {"breaker": {"failures": 2, "cooldown_s": 120}},
        "logging": {"level": "warning"},
    }


def tier_config(trained: Path, threads: int) -> dict[str, Any]:
    return {
        "rankers": {"pairrm": {"checkpoint": str(trained / "pairrm"), "threads": threads}},
        "fusers": {"genfuser": {"checkpoint": str(trained / "genfuser"), "threads": threads}},
        "api_keys_env": "TIER_KEYS",
    }


def _prompts(n: int) -> list[str]:
    return [f"What is {i} plus {i + 3}? Say it in words, then in digits." for i in range(n)]


def _answer(url: str, prompt: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/generate", json={"prompt": prompt, "return_candidates": True}, timeout=60)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return {"output": body["output"], "scores": {c["member"]: c["score"] for c in body["candidates"]}}


async def _load(urls: list[str], seconds: float, clients: int) -> Result:
    """Closed loop for ``seconds``: ``clients`` in all, split over ``urls``, one tally."""
    result = Result()
    per = max(1, clients // len(urls))
    await asyncio.gather(
        *(
            drive(u, lambda i: {"prompt": f"load {i % 50}"}, 10**9, per, 30.0, seconds=seconds, into=result)
            for u in urls
        )
    )
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    trained = ROOT / ".cache" / "tiny-models" / "trained"
    out: dict[str, Any] = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tier-")))
        stub = stack.enter_context(stub_server(delay_ms=20))
        tier = stack.enter_context(tier_process(tier_config(trained, args.threads), tmp, env={"TIER_KEYS": TIER_KEY}))
        tier_url, tier_proc = tier.url, tier.proc
        local_models = {
            "rankers": {"pairrm": {"checkpoint": str(trained / "pairrm"), "threads": args.threads}},
            "fusers": {"genfuser": {"checkpoint": str(trained / "genfuser"), "threads": args.threads}},
        }
        on_tier = {"endpoint": tier_url, "api_key_env": "TIER_KEY", "timeout_s": 30}
        remote_models = {"rankers": {"pairrm": on_tier}, "fusers": {"genfuser": on_tier}}
        os.environ["TIER_KEY"] = TIER_KEY  # the gateways inherit it
        (tmp / "local").mkdir()
        local = stack.enter_context(gateway_process(gateway_config(stub, local_models), tmp / "local"))
        replicas = []
        for i in range(2):
            (tmp / f"remote{i}").mkdir()
            replicas.append(
                stack.enter_context(gateway_process(gateway_config(stub, remote_models), tmp / f"remote{i}"))
            )
        prompts = _prompts(args.prompts)
        here = [_answer(local.url, p) for p in prompts]
        there = [_answer(replicas[i % 2].url, p) for i, p in enumerate(prompts)]
        out["identical_answers"] = sum(a == b for a, b in zip(here, there, strict=True))
        out["prompts"] = len(prompts)
        for name, urls in (("in_process", [local.url]), ("tier", [r.url for r in replicas])):
            c1 = asyncio.run(drive(urls[0], lambda i: {"prompt": f"c1 {i % 20}"}, args.c1, 1, 30.0))
            load = asyncio.run(_load(urls, args.seconds, args.clients))
            out[name] = {
                "c1_p50_ms": round(c1.pct(50), 1),
                "load_rps": round(load.answered / load.wall_s, 1),
                "load_p50_ms": round(load.pct(50), 1),
                "load_p99_ms": round(load.pct(99), 1),
                "errors": dict(load.errors),
                "degraded": load.degraded,
            }
        out["ratios"] = {
            "c1_p50": out["tier"]["c1_p50_ms"] / out["in_process"]["c1_p50_ms"],
            "load_rps": out["tier"]["load_rps"] / out["in_process"]["load_rps"],
        }
        # The tier killed under load: answers degrade, none is lost.
        timer = threading.Timer(args.kill_after, lambda: tier_proc.send_signal(signal.SIGKILL))
        timer.start()
        killed = asyncio.run(_load([r.url for r in replicas], args.seconds, args.clients))
        timer.cancel()
        out["tier_killed"] = {
            "sent": killed.sent,
            "answered": killed.answered,
            "degraded": killed.degraded,
            "errors": dict(killed.errors),
            "refused": killed.refused,
            "lost": killed.lost,
            "hung": killed.hung,
            "p50_ms": round(killed.pct(50), 1),
            "p99_ms": round(killed.pct(99), 1),
            "kill_after_s": args.kill_after,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20, help="prompts answered by both set-ups, compared")
    parser.add_argument("--c1", type=int, default=40, help="requests at one at a time, per set-up")
    parser.add_argument("--seconds", type=float, default=20.0, help="approximate seconds of load per set-up")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    parser.add_argument("--kill-after", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tier.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
