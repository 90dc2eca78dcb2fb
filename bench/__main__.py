"""``python -m bench [--quick] [--parts ...]``: run the benchmark, write the JSON and the doc table.

``--quick`` is the smoke run ``make test`` keeps (seconds, small shapes, stub members for the end
to end part): the same code paths and the same outputs, figures that mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import adapters, e2e, fuser, gateway, ranker, report
from bench.common import CACHE, ROOT, commit, machine
from bench.models import make_fuser_shaped, make_pairrm_shaped

logger = logging.getLogger("bench")

PARTS = ("ranker", "fuser", "e2e", "gateway", "adapters")


def tiny_models() -> Path:
    from service.models.checkpoints.tiny import make_tiny_models

    root = Path(os.environ.get("TINY_MODELS") or ROOT / ".cache" / "tiny-models")
    make_tiny_models(root)
    return root


def run(parts: list[str], quick: bool, real_shape: str) -> dict[str, Any]:
    tiny = tiny_models()
    shape = "mini" if quick else real_shape
    fuser_shape = "mini" if quick else "t5-base"
    out: dict[str, Any] = {}

    def part(name: str, fn: Any, *args: Any) -> None:
        logger.info("part %s", name)
        start = time.perf_counter()
        out[name] = {**fn(*args), "seconds": time.perf_counter() - start}
        logger.info("part %s took %.0f s", name, out[name]["seconds"])

    if "ranker" in parts:
        part(
            "ranker_tiny",
            ranker.run,
            ranker.Workload(
                label="tiny",
                checkpoint=tiny / "pairrm",
                c1_requests=2 if quick else 10,
                c8_rounds=1 if quick else 4,
                repeats=1 if quick else 3,
                c8_repeats=1 if quick else 3,
                source_words=(10, 30),
                cand_words=(10, 60),
                blender_c8=("serial",) if quick else ("serial", "threads", "batched"),
                schemes_requests=4 if quick else 40,
                flops=False,
            ),
        )
        real = make_pairrm_shaped(CACHE / f"pairrm-{shape}", tiny / "pairrm", shape)
        part(
            "ranker_real",
            ranker.run,
            ranker.Workload(
                label="real",
                checkpoint=real,
                c1_requests=2,
                c8_rounds=1,
                repeats=1 if quick else 2,
                c8_repeats=1,
                source_words=(10, 20),
                cand_words=(25, 50),
                blender_c8=("serial",),
                schemes_requests=0 if quick else 2,
                flops=True,
            ),
        )
    if "fuser" in parts:
        part(
            "fuser_tiny",
            fuser.run,
            fuser.Workload("tiny", tiny / "genfuser", prompts=1 if quick else 3, repeats=1 if quick else 3),
        )
        fuser_real = make_fuser_shaped(CACHE / f"fuser-{fuser_shape}", tiny / "genfuser", fuser_shape)
        part(
            "fuser_real",
            fuser.run,
            fuser.Workload("real", fuser_real, prompts=1 if quick else 2, repeats=1 if quick else 2, batched_repeats=1),
        )
    if "e2e" in parts:
        part(
            "e2e",
            e2e.run,
            e2e.Workload(
                tiny=tiny,
                members="stub" if quick else "vllm",
                requests_c1=1 if quick else 6,
                rounds_c8=1 if quick else 2,
                fuse_max_new_tokens=16 if quick else None,
            ),
        )
    if "gateway" in parts:
        part(
            "gateway",
            gateway.run,
            gateway.Workload(
                c1_requests=20,
                blocks=1,
                load_seconds=1.0,
                clients=("httpx_aiohttp", "aiohttp"),
                gateways=("shipped", "store", "traced", "traced_sampled", "limited"),
            )
            if quick
            else gateway.Workload(c1_requests=100, blocks=3, load_seconds=5.0),
        )
    if "adapters" in parts:  # the trained checkpoints and the adapters environment: `make models`
        small = {"requests_c1": 2, "requests_c8": 8} if quick else {}
        part("adapters", adapters.run, adapters.Workload(tiny / "trained", **small))
    return out


def keys(parts: dict[str, Any]) -> dict[str, Any]:
    def get(part: str, key: str) -> Any:
        return parts.get(part, {}).get(key)

    return {
        "ranker_speedup_c1_tiny": get("ranker_tiny", "speedup_c1"),
        "ranker_throughput_ratio_c8_tiny": get("ranker_tiny", "throughput_ratio_c8"),
        "ranker_speedup_c1_real": get("ranker_real", "speedup_c1"),
        "ranker_throughput_ratio_c8_real": get("ranker_real", "throughput_ratio_c8"),
        "ranker_flop_efficiency_real": get("ranker_real", "flop_efficiency"),
        "fuser_speedup": get("fuser_real", "speedup"),
        "fuser_ct2_speedup": (get("fuser_real", "ct2") or {}).get("ct2_default", {}).get("speedup_vs_ours"),
        "fuser_ct2_identical_share": (get("fuser_real", "ct2") or {})
        .get("ct2_default", {})
        .get("identical_share_vs_llm_blender"),
        "fuser_batched_throughput_ratio_tiny": (get("fuser_tiny", "batched") or {}).get("throughput_ratio"),
        "fuser_batched_throughput_ratio_real": (get("fuser_real", "batched") or {}).get("throughput_ratio"),
        "e2e_p50_speedup_c1": get("e2e", "p50_speedup_c1"),
        "e2e_throughput_ratio_c8": get("e2e", "throughput_ratio_c8"),
        "gateway_overhead_p50_ms": get("gateway", "overhead_p50_ms"),
        "gateway_floor_ratio": get("gateway", "floor_ratio"),
        "gateway_rps": get("gateway", "rps"),
        "fuse_in_e2e_ratio": get("e2e", "fuse_in_e2e_ratio"),
        "adapter_server_p50_ratio_c1": (get("adapters", "p50_ratio_c1") or {}).get("bn-sort"),
        "adapter_server_throughput_ratio_c8": (get("adapters", "throughput_ratio_c8") or {}).get("bn-sort"),
        "gateway_store_rps_share": (get("gateway", "store") or {}).get("rps_ratio"),
        "gateway_store_c1_p50_ratio": (get("gateway", "store") or {}).get("c1_p50_ratio"),
        "gateway_traced_rps_share": (get("gateway", "traced") or {}).get("rps_ratio"),
        "gateway_traced_c1_p50_ratio": (get("gateway", "traced") or {}).get("c1_p50_ratio"),
        "gateway_traced_sampled_rps_share": (get("gateway", "traced_sampled") or {}).get("rps_ratio"),
        "gateway_traced_sampled_c1_p50_ratio": (get("gateway", "traced_sampled") or {}).get("c1_p50_ratio"),
        "gateway_limited_rps_share": (get("gateway", "limited") or {}).get("rps_ratio"),
        "gateway_limited_c1_p50_ratio": (get("gateway", "limited") or {}).get("c1_p50_ratio"),
        "gateway_rps_floor_share": _ratio(
            get("gateway", "rps"), ((get("gateway", "load") or {}).get("floor_aiohttp") or {}).get("rps")
        ),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke run: seconds, small shapes, stub members")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--real-shape", default="base", choices=["base", "large"], help="PairRM shape for part 1")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr, force=True)
    for noisy in ("httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {sorted(unknown)}")
    if args.quick:
        # The smoke run's figures mean nothing; one thread keeps it quick on a busy machine, where
        # OpenMP threads that wait for each other slow everything down many times over.
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
    started = time.time()
    info = machine()
    results = run(parts, args.quick, args.real_shape)
    flat = keys(results)
    out: dict[str, Any] = {
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "mode": "quick" if args.quick else "full",
        "started": dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.time() - started,
        "load_average_at_end": os.getloadavg()[0],
        "commit": commit(),
        "machine": info,
        **flat,
        "goals": {k: {"op": op, "target": t} for k, (op, t, _) in report.GOALS.items()},
        "goals_met": {k: report.met(k, v) for k, v in flat.items()},
        "parts": results,
    }
    report.write_json(out, args.out)
    report.write_markdown(out, args.doc)
    logger.info("wrote %s and %s", args.out, args.doc)
    for k, v in flat.items():
        logger.info("%-34s %s", k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
