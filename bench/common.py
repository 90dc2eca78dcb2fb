"""Timing, workloads and machine facts shared by the benchmark parts."""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"

_WORDS = " ".join(
    [
        "the of and to in is was for on that with as by at from an were are which this be has have had one ",
        "not but all new more first two after who they their been its also time city world year people ",
        "capital france paris river music science history water energy answer question model language ",
        "learning system data light power number small large good better best great simple clear short long ",
        "fast slow open close red blue green what where when why how can will would should could may might ",
        "must do does did ",
    ]
).split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def text(rng: random.Random, words: int) -> str:
    """About ``words`` words of vocabulary the tiny tokenizers know, in sentences."""
    out: list[str] = []
    while words > 0:
        n = min(words, rng.randint(6, 14))
        out.append(sentence(rng, n))
        words -= n
    return " ".join(out)


@dataclass(frozen=True)
class RankRequest:
    source: str
    candidates: list[str]


def rank_requests(
    count: int, seed: int, source_words: tuple[int, int], cand_words: tuple[int, int], n: int = 5
) -> list[RankRequest]:
    rng = random.Random(seed)
    return [
        RankRequest(text(rng, rng.randint(*source_words)), [text(rng, rng.randint(*cand_words)) for _ in range(n)])
        for _ in range(count)
    ]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return float(s[k])


def alternate(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run each contender ``repeats`` times, alternating them and reversing the order every
    other round, so that drift in the machine's load hits all of them alike."""
    names = list(contenders)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(contenders[name]())
    return out


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    except (OSError, StopIteration):
        simd = []
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "simd": simd,
        "memory_gib": round(mem_gib, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0],
    }
