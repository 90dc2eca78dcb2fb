"""``python -m bench.gpu``: the gateway's PairRM and GenFuser at the published models' shapes on a GPU,
against llm-blender on the same GPU, in the same precision, in one run.

- PairRM at DeBERTa-v3-large shape (PairRM's backbone): pairs per second with pairs of about
  ``--pair-tokens`` tokens (source + two candidates; default 512), one request at a time and eight
  clients at once (llm-blender batching the eight in one ``Blender.rank`` call, its best case), and
  the parity of the scores (largest difference, share of requests with the same first candidate).
- GenFuser at Flan-T5-XL shape (2.85 B parameters): top-3 fusion latency, and the share of fused
  texts identical to ``Blender.fuse``'s.
- The model tier (``bench/remote.py``): the same two models in this process and behind
  ``serve-models`` on the same device, called as a gateway calls them: pairs/s and fusions/s one
  request at a time and from eight clients, and whether scores and fused texts are the same.

Random weights (no hub here; what costs time is the shapes and the token counts, not the values),
built once under .cache/bench. Default: cuda, bfloat16; about 10 minutes on one H200-class GPU, most of
it writing and loading the 3 B fuser. ``--smoke`` runs the same code on the CPU with tiny shapes in
seconds (``make test`` does, so the script cannot rot). Writes bench/results/gpu.json (``--out``) and
prints a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bench import fuser, ranker, remote
from bench.common import CACHE, ROOT, commit
from bench.models import make_fuser_shaped, make_pairrm_shaped

logger = logging.getLogger("bench.gpu")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(torch.device(device)))
    return "cpu"


def words_for(checkpoint: Path, pair_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Word counts for the source and each candidate so that a pair (source + two candidates) is about
    ``pair_tokens`` tokens under ``checkpoint``'s tokenizer (the source a fifth, each candidate two fifths)."""
    import random

    from transformers import AutoTokenizer

    from bench.common import text

    tok = AutoTokenizer.from_pretrained(checkpoint)
    sample = text(random.Random(3), 400)
    per_word = len(tok(sample, add_special_tokens=False)["input_ids"]) / 400
    source = max(1, round(pair_tokens * 0.2 / per_word))
    cand = max(1, round(pair_tokens * 0.4 / per_word))
    return (source, source), (cand, cand)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from service.models.checkpoints.tiny import make_tiny_models

    tiny = make_tiny_models(ROOT / ".cache" / "tiny-models")
    shape, fshape = ("mini", "mini") if args.smoke else ("large", "t5-xl")
    out: dict[str, Any] = {}

    pairrm = make_pairrm_shaped(CACHE / f"pairrm-{shape}", tiny["pairrm"], shape)
    source_words, cand_words = words_for(pairrm, args.pair_tokens)
    start = time.perf_counter()
    out["ranker"] = ranker.run(
        ranker.Workload(
            label=f"deberta-{shape}",
            checkpoint=pairrm,
            c1_requests=2 if args.smoke else 20,
            c8_rounds=1 if args.smoke else 4,
            repeats=1 if args.smoke else 3,
            c8_repeats=1 if args.smoke else 2,
            source_words=source_words,
            cand_words=cand_words,
            blender_c8=("serial", "batched"),
            schemes_requests=0,
            flops=False,
            device=args.device,
            dtype=args.dtype,
        )
    )
    r = out["ranker"]
    pairs = r["pairs_per_request"]
    r["pairs_per_s_c1"] = {k: pairs * 1000 / v for k, v in r["c1_p50_ms"].items()}
    r["pairs_per_s_c8"] = {k: pairs * v for k, v in r["c8_requests_per_s"].items()}
    r["seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    checkpoint = make_fuser_shaped(CACHE / f"fuser-{fshape}-{args.dtype}", tiny["genfuser"], fshape, dtype=args.dtype)
    out["fuser"] = fuser.run(
        fuser.Workload(
            f"t5-{fshape}",
            checkpoint,
            prompts=1 if args.smoke else 8,
            repeats=1 if args.smoke else 2,
            device=args.device,
            dtype=args.dtype,
        )
    )
    out["fuser"]["seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    out["tier"] = remote.run(
        pairrm,
        checkpoint,
        args.device,
        args.dtype,
        source_words=source_words,
        cand_words=cand_words,
        requests=2 if args.smoke else 20,
        rounds=1 if args.smoke else 3,
    )
    out["tier"]["seconds"] = time.perf_counter() - start
    return out


def table(result: dict[str, Any]) -> str:
    r, f = result["parts"]["ranker"], result["parts"]["fuser"]
    rows = [
        ("PairRM pairs/s, 1 request at a time", r["pairs_per_s_c1"]["ours"], r["pairs_per_s_c1"]["llm_blender"]),
        (
            "PairRM pairs/s, 8 clients (llm-blender: 8 in one call)",
            r["pairs_per_s_c8"]["ours"],
            r["pairs_per_s_c8"].get("llm_blender_batched", float("nan")),
        ),
        ("GenFuser top-3 fusion p50 (ms)", f["p50_ms"]["ours"], f["p50_ms"]["llm_blender"]),
    ]
    lines = [
        f"{result['device_name']}, {result['dtype']}; PairRM {r['model']}, pairs of {r['pair_tokens_mean']:.0f} "
        f"tokens; GenFuser {f['model']}.",
        "",
        "| figure | this gateway | llm-blender | ratio |",
        "|---|---|---|---|",
    ]
    for name, ours, ref in rows:
        ratio = ref / ours if "ms" in name else ours / ref
        lines.append(f"| {name} | {ours:.1f} | {ref:.1f} | {ratio:.2f}x |")
    t = result["parts"].get("tier")
    if t is not None:
        lines += [
            "",
            "The model tier (`serve-models` on the same device, loopback HTTP) against the same models in process:",
            "",
            "| figure | in process | through the tier | ratio |",
            "|---|---|---|---|",
        ]
        for part, unit in (("ranker", "PairRM pairs/s"), ("fuser", "GenFuser fusions/s")):
            per = t[part]["per_request"]
            c1 = {k: per * 1000 / v for k, v in t[part]["c1_p50_ms"].items()}
            for label, figures in (("1 request at a time", c1), ("8 clients", t[part]["c8_per_s"])):
                ours, tier = figures["in_process"], figures["tier"]
                lines.append(f"| {unit}, {label} | {ours:.1f} | {tier:.1f} | {tier / ours:.2f}x |")
        lines.append(
            f"Scores equal in {100 * t['scores_equal_share']:.0f}% of requests, fused texts identical in "
            f"{100 * t['fused_identical_share']:.0f}%."
        )
    lines += [
        "",
        f"Parity in the same run: scores within {r['max_abs_score_diff_vs_llm_blender']:.2g} of llm-blender's, the "
        f"same first candidate in {100 * r['same_first_share']:.0f}% of requests; fused texts identical to "
        f"Blender.fuse's in {100 * f['identical_share']:.0f}% of prompts.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--pair-tokens", type=int, default=512, help="tokens per ranked pair (default 512)")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, tiny shapes: seconds (make test)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    result = {
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "device": args.device,
        "device_name": device_name(args.device),
        "dtype": args.dtype,
        "smoke": args.smoke,
        "parts": run(args),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
