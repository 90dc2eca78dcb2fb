"""Part 2: fusion of the top 3, this project's GenFuser against llm-blender's ``Blender.fuse``.

Both get the same instruction, input and candidates; the texts must be identical, and the figure
is the ratio of the median times per prompt.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import CACHE, alternate, median, text
from bench.reference import blender_fuse, blender_fuser
from service.config import FuserConfig
from service.models.fusers.genfuser import GenFuser

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusePrompt:
    instruction: str
    input_text: str
    candidates: list[str]


def fuse_prompts(count: int, seed: int, cand_words: tuple[int, int]) -> list[FusePrompt]:
    rng = random.Random(seed)
    return [
        FusePrompt(
            rng.choice(["", "Answer briefly. ", "Explain: "]),
            text(rng, rng.randint(8, 20)),
            [text(rng, rng.randint(*cand_words)) for _ in range(3)],
        )
        for _ in range(count)
    ]


@dataclass(frozen=True)
class Workload:
    label: str
    checkpoint: Path
    prompts: int
    repeats: int
    cand_words: tuple[int, int] = (40, 120)
    fuser: dict[str, Any] | None = None  # FuserConfig overrides for this project's side
    device: str = "cpu"  # both sides
    dtype: str = "float32"
    # The opt-in CTranslate2 engine, A/B beside the default (lean decoder), per compute type.
    ct2: tuple[str, ...] = ("default", "int8")
    # Batched fusion: this many fusions sent at once, batched (max_batch_requests) against one at a time,
    # each way this many times (default: repeats).
    concurrent: int = 8
    batched_repeats: int | None = None


def run(w: Workload) -> dict[str, Any]:
    """GenFuser against Blender.fuse, alternating; then batched fusion; then the CTranslate2 engines,
    last and among themselves: once CTranslate2 has run in a process, torch's decoding there was
    about 1.5x slower (4.0 -> 6.0 s a T5-base fusion, still 2 s later, with no CPU spent meanwhile),
    so timing it in turn with the torch contenders would slow them down."""
    prompts = fuse_prompts(w.prompts, seed=5, cand_words=w.cand_words)
    logger.info("fuser %s: loading", w.label)
    blender = blender_fuser(w.checkpoint, w.device, w.dtype)
    settings = {"checkpoint": str(w.checkpoint), "device": w.device, "dtype": w.dtype, **(w.fuser or {})}
    ours = GenFuser("bench", FuserConfig.model_validate(settings))
    try:
        ours_text = [ours.fuse_sync(p.instruction, p.input_text, p.candidates) for p in prompts]
        ref_text = [blender_fuse(blender, p.instruction, p.input_text, p.candidates) for p in prompts]
        logger.info("fuser %s: %d prompts x %d", w.label, len(prompts), w.repeats)
        per_prompt = _time_prompts(
            {
                "ours": lambda p: ours.fuse_sync(p.instruction, p.input_text, p.candidates),
                "llm_blender": lambda p: blender_fuse(blender, p.instruction, p.input_text, p.candidates),
            },
            prompts,
            w.repeats,
        )
        ours_s, ref_s = median(per_prompt["ours"]), median(per_prompt["llm_blender"])
        words = [len(t.split()) for t in ours_text]
        model: Any = getattr(ours.engine, "model")  # noqa: B009 (the torch engines hold one)
        mc = model.config
        out = {
            "model": f"T5 d_model {mc.d_model}, {mc.num_layers}+{mc.num_decoder_layers} layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.3g} M parameters",
            "identical_text": ours_text == ref_text,
            "identical_share": sum(a == b for a, b in zip(ours_text, ref_text, strict=True)) / len(prompts),
            "mismatches": [i for i, (a, b) in enumerate(zip(ours_text, ref_text, strict=True)) if a != b],
            "output_words_mean": sum(words) / len(words),
            "p50_ms": {"ours": ours_s * 1000, "llm_blender": ref_s * 1000},
            "speedup": ref_s / ours_s,
        }
    finally:
        ours.close()
    out["batched"] = _batched(w, settings, prompts, ours_text, ref_text)
    out["ct2"] = _ct2(w, settings, prompts, ref_text, ours_s, ref_s)
    return out


def _time_prompts(contenders: dict[str, Any], prompts: list[FusePrompt], repeats: int) -> dict[str, list[float]]:
    """Seconds per prompt for each contender: alternating, the median over repeats."""

    def timed_all(fuse: Any) -> list[float]:
        out = []
        for p in prompts:
            t = time.perf_counter()
            fuse(p)
            out.append(time.perf_counter() - t)
        return out

    runs = alternate({name: lambda f=f: timed_all(f) for name, f in contenders.items()}, repeats)  # type: ignore[misc]
    return {name: [median([run[i] for run in results]) for i in range(len(prompts))] for name, results in runs.items()}


def _ct2(
    w: Workload, settings: dict[str, Any], prompts: list[FusePrompt], ref_text: list[str], ours_s: float, ref_s: float
) -> dict[str, Any]:
    """The CTranslate2 engines, timed among themselves after the torch contenders; their speed-ups
    are against the medians those had."""
    engines: dict[str, GenFuser] = {}
    try:
        for ct in w.ct2:
            engine = _ct2_fuser(settings, ct)
            if engine is not None:
                engines[f"ct2_{ct}"] = engine
        texts = {
            name: [f.fuse_sync(p.instruction, p.input_text, p.candidates) for p in prompts]
            for name, f in engines.items()
        }
        per_prompt = _time_prompts(
            {
                name: lambda p, f=f: f.fuse_sync(p.instruction, p.input_text, p.candidates)
                for name, f in engines.items()
            },
            prompts,
            w.repeats,
        )
    finally:
        for f in engines.values():
            f.close()
    return {
        name: {
            "p50_ms": median(per_prompt[name]) * 1000,
            "speedup_vs_ours": ours_s / median(per_prompt[name]),
            "speedup_vs_llm_blender": ref_s / median(per_prompt[name]),
            "identical_share_vs_llm_blender": sum(a == b for a, b in zip(got, ref_text, strict=True)) / len(prompts),
        }
        for name, got in texts.items()
    }


def _ct2_fuser(settings: dict[str, Any], compute_type: str) -> GenFuser | None:
    """This project's GenFuser on the CTranslate2 engine (None where CTranslate2 is not installed)."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        logger.warning("fuser: CTranslate2 not installed; its engine is not measured")
        return None
    config = FuserConfig.model_validate({**settings, "engine": "ctranslate2", "compute_type": compute_type})
    return GenFuser(f"ct2-{compute_type}", config, CACHE)


def _batched(
    w: Workload, settings: dict[str, Any], prompts: list[FusePrompt], alone: list[str], blender: list[str]
) -> dict[str, Any]:
    """``w.concurrent`` fusions sent at once (the prompts repeated), the fuser batching them against
    the same fuser taking them one at a time: fusions per second, the ratio, and whether every text
    is the one the prompt gets alone. Where the skinny products apply (they make a batched step run
    per prompt), also batched with the plain products (``skinny_products: false``)."""
    import asyncio

    batch = [prompts[i % len(prompts)] for i in range(w.concurrent)]
    fusers = {
        "batched": GenFuser("batched", FuserConfig.model_validate({**settings, "max_batch_requests": w.concurrent})),
        "one_at_a_time": GenFuser("one", FuserConfig.model_validate({**settings, "max_batch_requests": 1})),
    }
    lean = getattr(fusers["batched"].engine, "lean", None)
    if lean is not None and lean.skinny:
        plain = {**settings, "max_batch_requests": w.concurrent, "skinny_products": False}
        fusers["batched_plain_products"] = GenFuser("plain", FuserConfig.model_validate(plain))

    async def burst(f: GenFuser) -> tuple[float, list[str]]:
        t = time.perf_counter()
        texts = await asyncio.gather(*(f.fuse(p.instruction, p.input_text, p.candidates) for p in batch))
        return time.perf_counter() - t, list(texts)

    try:
        texts: dict[str, list[str]] = {}

        def timed(name: str) -> float:
            seconds, texts[name] = asyncio.run(burst(fusers[name]))
            return seconds

        logger.info("fuser %s: %d fusions at once, batched and one at a time", w.label, w.concurrent)
        repeats = w.batched_repeats or w.repeats
        runs = alternate({name: lambda name=name: timed(name) for name in fusers}, repeats)  # type: ignore[misc]
        rate = {name: w.concurrent / median(results) for name, results in runs.items()}
        want = [alone[i % len(prompts)] for i in range(w.concurrent)]
        return {
            "concurrent": w.concurrent,
            "fusions_per_s": rate,
            "throughput_ratio": rate["batched"] / rate["one_at_a_time"],
            "identical_to_alone": texts["batched"] == want and texts["one_at_a_time"] == want,
            "identical_share_vs_llm_blender": {
                name: sum(blender[i % len(prompts)] == t for i, t in enumerate(got)) / w.concurrent
                for name, got in texts.items()
            },
            "largest_batch": batcher.largest_batch if (batcher := fusers["batched"].batcher) else 1,
            # False on a CPU whose products give a row other floats among other rows: then a
            # shared step runs each fusion's products alone (service.models.fusers.products).
            "shares_products": bool(lean is not None and lean.shares_products),
        }
    finally:
        for f in fusers.values():
            f.close()
