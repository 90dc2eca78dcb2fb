"""Part 5: bottleneck and prefix-tuning members on the gateway's adapter server (transformers + the
``adapters`` library, ``service/adapterserver``) against a LoRA member on vLLM-CPU, same base (the
demo's trained base A), same prompts (the suite's sort prompts under the chat template), greedy, 16
new tokens at most. Each server runs alone while it is measured (one at a time on these 2 cores):
p50 latency one request at a time, and requests per second with 8 clients.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    trained: Path
    requests_c1: int = 20
    requests_c8: int = 48


def _prompts(n: int) -> list[str]:
    from service.quality import suite

    items = [it for it in suite.eval_suite(suite.DEFAULT_EVAL_SEED, max(n, 10)) if it.tag == "sort"]
    return [items[i % len(items)].prompt for i in range(n)]


def _measure(url: str, model: str, w: Workload) -> dict[str, Any]:
    def call(client: httpx.Client, prompt: str) -> tuple[float, int]:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
        t = time.perf_counter()
        r = client.post(f"{url}/chat/completions", json=body, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - t, int(r.json()["usage"]["completion_tokens"])

    with httpx.Client() as client:
        for p in _prompts(3):  # warm-up
            call(client, p)
        c1 = [call(client, p) for p in _prompts(w.requests_c1)]
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            c8 = list(pool.map(lambda p: call(client, p), _prompts(w.requests_c8)))
        wall = time.perf_counter() - start
    return {
        "c1_p50_ms": statistics.median(t for t, _ in c1) * 1000,
        "c1_tokens_mean": statistics.mean(n for _, n in c1),
        "c8_requests_per_s": len(c8) / wall,
        "c8_tokens_per_s": sum(n for _, n in c8) / wall,
    }


def run(w: Workload) -> dict[str, Any]:
    from service.config import ServerConfig
    from service.ops.launcher import Launcher

    base = str(w.trained / "base-a")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    vllm = ServerConfig(
        name="vllm",
        model=base,
        served_model_names=["base-a"],
        args=["--max-model-len", "256", "--dtype", "float32", "--enforce-eager", "--enable-lora"],
        env=env,
    )
    adapters = ServerConfig(name="adapters", engine="adapters", model=base, served_model_names=["base-a"])
    setups = [
        (vllm, ["--lora-modules", f"lora-sort={w.trained / 'lora-sort'}"], ["lora-sort"]),
        (
            adapters,
            ["--adapter", f"bn-sort={w.trained / 'bn-sort'}", "--adapter", f"prefix-sort={w.trained / 'prefix-sort'}"],
            ["bn-sort", "prefix-sort"],
        ),
    ]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        for cfg, extra, models in setups:
            launcher = Launcher(Path(tmp) / cfg.name)
            try:
                launcher.start([cfg], {cfg.name: extra})
                url = launcher.base_urls()[cfg.name]
                for model in models:
                    logger.info("adapters: %s on %s", model, cfg.name)
                    server = "vLLM-CPU" if cfg.engine == "vllm" else "adapter server"
                    out[model] = {"server": server, **_measure(url, model, w)}
            finally:
                launcher.stop()
    lora, mine = out["lora-sort"], ("bn-sort", "prefix-sort")
    return {
        "members": out,
        "p50_ratio_c1": {m: out[m]["c1_p50_ms"] / lora["c1_p50_ms"] for m in mine},
        "throughput_ratio_c8": {m: lora["c8_requests_per_s"] / out[m]["c8_requests_per_s"] for m in mine},
    }
