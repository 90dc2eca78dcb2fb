"""The benchmark's smoke run (`python -m bench --quick`): it runs every part end to end on small
shapes and stub members, so the benchmark cannot rot. Speed is not checked here; what is: every
key is written, our scores equal llm-blender's, our fused text equals Blender.fuse's, the
gateway answered every request, and the doc table was generated."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench import fusion
from bench.report import BEGIN, END, GOALS

ROOT = Path(__file__).resolve().parents[2]


def run_module(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m ARGV...`` from the repository root; fails the test with its stderr unless it exits 0."""
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_quick_bench_writes_every_figure_and_keeps_parity(tmp_path: Path) -> None:
    out, doc = tmp_path / "quick.json", tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nHand-written analysis stays.\n")
    run_module("bench", "--quick", "--out", str(out), "--doc", str(doc), timeout=240)
    data = json.loads(out.read_text())
    for key in GOALS:
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
        assert key in data["goals_met"]
    parts = data["parts"]
    for ranker in ("ranker_tiny", "ranker_real"):
        assert parts[ranker]["max_abs_score_diff_vs_llm_blender"] <= 1e-4
    for fuser in ("fuser_tiny", "fuser_real"):
        assert parts[fuser]["identical_text"], parts[fuser]["mismatches"]
        assert set(parts[fuser]["ct2"]) == {"ct2_default", "ct2_int8"}  # the opt-in engine, A/B
    assert parts["e2e"]["same_output_share"] == 1.0
    assert parts["gateway"]["c1_errors"] == dict.fromkeys(parts["gateway"]["c1_errors"], 0)
    # Each costed feature ran beside the shipped path: the store, tracing to an OTLP receiver, limits in Redis.
    assert {"gateway_store", "gateway_traced", "gateway_limited"} <= set(parts["gateway"]["c1_errors"])
    assert all(parts["gateway"][v]["rps_ratio"] > 0 for v in ("store", "traced", "limited"))
    assert parts["ranker_tiny"]["schemes"]["tournament"]["pairs_per_request"] == 8
    text = doc.read_text()
    assert "Hand-written analysis stays." in text and BEGIN in text and END in text
    assert all(f"`{key}`" in text for key in GOALS)


def test_gpu_bench_runs_its_code_on_the_cpu_with_tiny_shapes(tmp_path: Path) -> None:
    """`python -m bench.gpu --smoke`: the GPU run's code, on the CPU in float32 with mini shapes."""
    out = tmp_path / "gpu.json"
    proc = run_module("bench.gpu", "--smoke", "--out", str(out), timeout=300)
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["device"] == "cpu" and data["dtype"] == "float32"
    ranker, fuser = data["parts"]["ranker"], data["parts"]["fuser"]
    assert ranker["max_abs_score_diff_vs_llm_blender"] <= 1e-4 and ranker["same_first_share"] == 1.0
    assert 400 <= ranker["pair_tokens_mean"] <= 650, ranker["pair_tokens_mean"]  # pairs of about 512 tokens
    for figures in (ranker["pairs_per_s_c1"], ranker["pairs_per_s_c8"], fuser["p50_ms"]):
        assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert fuser["identical_share"] == 1.0, fuser["mismatches"]
    assert "| PairRM pairs/s, 1 request at a time |" in proc.stdout
    # The model tier beside the same models in process: the same answers, and every figure measured.
    tier = data["parts"]["tier"]
    assert tier["scores_equal_share"] == 1.0 and tier["fused_identical_share"] == 1.0
    for part in ("ranker", "fuser"):
        for figures in (tier[part]["c1_p50_ms"], tier[part]["c8_per_s"]):
            assert set(figures) == {"in_process", "tier"} and all(v > 0 for v in figures.values()), figures
    assert "| GenFuser fusions/s, 8 clients |" in proc.stdout


def test_tier_bench_runs_end_to_end_small(tmp_path: Path) -> None:
    """`python -m bench.tier` at a small size: both set-ups answer the same, load is served, and the
    tier killed under load loses nothing (the figures in docs/PERFORMANCE.md come from its full run)."""
    out = tmp_path / "tier.json"
    run_module(
        "bench.tier", "--prompts", "3", "--c1", "3", "--seconds", "2", "--clients", "4", "--kill-after", "0.5",
        "--out", str(out), timeout=600,
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["identical_answers"] == data["prompts"] == 3
    for setup in ("in_process", "tier"):
        assert data[setup]["errors"] == {} and data[setup]["degraded"] == 0 and data[setup]["load_rps"] > 0, data[setup]
    killed = data["tier_killed"]
    assert killed["sent"] == killed["answered"] > 0 and killed["lost"] == killed["hung"] == 0, killed
    assert killed["degraded"] > 0  # the tier was gone for some of them


def test_fusion_bench_runs_end_to_end_small(tmp_path: Path) -> None:
    """`python -m bench.fusion` on a few prompts and steps (the checkpoints `make models` trained): every
    variant trains and is scored beside the ranker's first choice, the top-3 oracle and what copying can
    reach (the compound prompts apart from "all"), and the QUALITY.md section renders."""
    out = tmp_path / "fusion.json"
    proc = run_module("bench.fusion", "--limit", "40", "--steps", "4", "--out", str(out), timeout=600)
    data = json.loads(out.read_text())
    assert data["heldout"] == 5 * 8 and len(data["variants"]) == len(fusion.VARIANTS)
    assert [v["recipe"] for v in data["variants"]].count(True) == 1
    every = (data["ranker_first"], data["oracle"], data["covered"], *(v["exact_match"] for v in data["variants"]))
    for scores in every:
        assert set(scores) == {"add", "capital", "reverse", "sort", "compound", "all"} and all(
            0 <= x <= 100 for x in scores.values()
        )
    assert data["covered"]["all"] >= data["oracle"]["all"] >= data["ranker_first"]["all"]
    # No member answers both halves of a compound prompt; lora-capital and base-b each answer one.
    assert data["oracle"]["compound"] < data["covered"]["compound"]
    assert "## Fusion: what was tried" in proc.stdout and "| ranker's first choice |" in proc.stdout
