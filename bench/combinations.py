"""The other ways to combine models, for ``python -m bench.quality``: a prompt ensemble of three soft
prompts by vote, adapter soups against their parts, merged models against their parents. Each pass is
``ensemble-gateway eval`` of one ensemble on the skills it concerns (the same held-out suite), with
its servers started as ``serve`` starts them; QUALITY.md gets one section and one chart per pass.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT


@dataclass(frozen=True)
class Pass:
    key: str
    config: Path
    ensemble: str
    skills: tuple[str, ...]
    title: str


PASSES = (
    Pass("prompt_ensemble", ROOT / "config" / "demo.yaml", "prompt-ensemble", ("reverse",), "Prompt ensemble"),
    Pass(
        "prompt_ensemble_brief",
        ROOT / "config" / "demo.yaml",
        "prompt-ensemble-brief",
        ("reverse",),
        "Prompt ensemble, briefly trained prompts",
    ),
    Pass("soups", ROOT / "config" / "demo.yaml", "soups", ("sort", "capital"), "Adapter soups"),
    Pass("merges", ROOT / "config" / "merges.yaml", "merges", ("sort", "capital"), "Merged models"),
    Pass(
        "adapter_members",
        ROOT / "config" / "demo.yaml",
        "with-adapters",
        ("add", "capital", "reverse", "sort"),
        "Bottleneck and prefix-tuning members",
    ),
)

RunEval = Callable[[Path, list[str], Path, int, str], dict[str, Any]]


def run_passes(dataset: Path, work: Path, concurrency: int, run_eval: RunEval) -> dict[str, Any]:
    """Each pass's report, evaluated on the lines of ``dataset`` tagged with its skills."""
    lines = dataset.read_text().splitlines()
    out: dict[str, Any] = {}
    for p in PASSES:
        subset = work / f"suite-{p.key}.jsonl"
        subset.write_text("".join(line + "\n" for line in lines if any(f'"tag": "{s}"' in line for s in p.skills)))
        out[p.key] = run_eval(subset, ["--config", str(p.config)], work / p.key, concurrency, p.ensemble)
    return out


def _em(report: dict[str, Any], tag: str, row: str) -> float:
    return float(report["scores"][tag][row]["exact_match"])


def _table(report: dict[str, Any], skills: tuple[str, ...], rows: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(["model", *(f"{s} (%)" for s in skills)]) + " |", "|---" * (len(skills) + 1) + "|"]
    for label, row in rows:
        out.append("| " + " | ".join([label, *(f"{_em(report, s, row):.1f}" for s in skills)]) + " |")
    return out


def section(combos: dict[str, Any] | None, doc_dir: Path, work: Path, main: dict[str, Any] | None = None) -> list[str]:
    """QUALITY.md's sections for the passes that ran (their charts copied next to the doc); ``main`` is the
    demo ensemble's own report, which the adapter members' pass is compared with."""
    if not combos:
        return []
    lines: list[str] = []
    for p in PASSES:
        report = combos.get(p.key)
        if report is None:
            continue
        chart = f"quality-{p.key.replace('_', '-')}.png"
        if (work / p.key / "chart.png").exists():
            shutil.copyfile(work / p.key / "chart.png", doc_dir / chart)
        members = sorted(r.removeprefix("member ") for r in report["scores"]["overall"] if r.startswith("member "))
        lines += [f"## {p.title}", ""]
        lines += _adapter_members(p, report, main) if p.key == "adapter_members" else _explain(p, report, members)
        lines += ["", f"![{p.title}]({chart})", ""]
    return lines


def _explain(p: Pass, report: dict[str, Any], members: list[str]) -> list[str]:
    n = report["items"]
    if p.key.startswith("prompt_ensemble"):
        rows = [(m, f"member {m}") for m in members]
        rows += [("majority vote of the three (the ensemble's answer)", "ensemble (policy)"), ("oracle", "oracle")]
        vote = _em(report, "reverse", "ensemble (policy)")
        best = max(_em(report, "reverse", f"member {m}") for m in members)
        mean = _em(report, "reverse", "random member")
        who = (
            "soft-reverse, and soft-reverse-2 and -3 trained as long with other seeds, 16 and 8 virtual tokens"
            if p.key == "prompt_ensemble"
            else "three prompts of 16 virtual tokens, each trained for 40 steps where soft-reverse had 200"
        )
        if best >= 99.0:
            verdict = "at the ceiling there is nothing to correct."
        elif vote > best:
            verdict = "the prompts err on different words, so the majority corrects some of each one's mistakes."
        else:
            verdict = (
                f"the vote beats the average prompt ({mean:.1f}%) but not the best one: where two prompts agree on "
                "a wrong answer the majority keeps the mistake. One of the three is right on "
                f"{_em(report, 'reverse', 'oracle'):.1f}% of the prompts: what a better chooser could reach."
            )
        return [
            f"Three soft prompts over the frozen base A (`{p.ensemble}`: {who}), their answers combined by majority "
            f"vote, ties to member order (Lester et al.); {n} held-out reverse prompts.",
            "",
            *_table(report, p.skills, rows),
            "",
            f"The vote scores {vote:.1f}% against {best:.1f}% for the best soft prompt alone "
            f"({vote - best:+.1f} points): {verdict}",
        ]
    rows = [(m, f"member {m}") for m in members]
    table = _table(report, p.skills, rows)
    parts, made = members[:2], members[2:]
    best_made = {s: max(_em(report, s, f"member {m}") for m in made) for s in p.skills}
    parent_best = {s: max(_em(report, s, f"member {m}") for m in parts) for s in p.skills}
    both = ", ".join(f"{s} {best_made[s]:.1f}% (best part {parent_best[s]:.1f}%)" for s in p.skills)
    if p.key == "soups":
        intro = (
            f"Soups of the two skill LoRAs over base A (`soups`), built by the gateway with PEFT's "
            f"`add_weighted_adapter` (weights 0.5 and 0.5): `linear` (A and B matrices combined one by one, rank 8) "
            f"and `cat` (stacked, rank 16: exactly the average of the two updates); {n} held-out prompts."
        )
    else:
        intro = (
            f"Two full fine-tunes of base A, one per skill (ft-sort, ft-capital), and three merges of them built by "
            f"the gateway with mergekit (`config/merges.yaml`): linear (0.5 each), task_arithmetic (base A plus both "
            f"differences) and ties (density 0.5), each served by its own vLLM server; {n} held-out prompts."
        )
    kept = [s for s in p.skills if best_made[s] >= parent_best[s] - 5]
    if p.key == "soups":
        note = (
            "`cat`'s update is exactly 0.5 ΔW_sort + 0.5 ΔW_capital; `linear` mixes the two adapters' A and B "
            "matrices, so its update also has cross terms. AdapterSoup averages adapters of nearby domains, whose "
            "updates point the same way; these two skills are unrelated, so half of each update is what each skill "
            "gets."
        )
    else:
        note = (
            "linear averages the two fine-tunes' weights; task_arithmetic and ties add both fine-tunes' differences "
            "from base A (ties keeps the larger half of each and elects signs where they disagree)."
        )
    share = {s: best_made[s] / parent_best[s] if parent_best[s] else 0.0 for s in p.skills}
    strong, weak = sorted(p.skills, key=share.__getitem__, reverse=True)[:2]
    verdict = (
        f"A combined model comes within 5 points of its best part on {', '.join(kept)}."
        if kept
        else "No combined model comes within 5 points of its best part on either skill;"
    ) + (
        f" {strong} survives the combination better ({100 * share[strong]:.0f}% of its best part's score) than "
        f"{weak} ({100 * share[weak]:.0f}%)."
    )
    return [intro, "", *table, "", f"Best of the combined models per skill: {both}. {verdict} {note}"]


def _adapter_members(p: Pass, report: dict[str, Any], main: dict[str, Any] | None) -> list[str]:
    order = ["base-a", "lora-sort", "bn-sort", "prefix-sort", "lora-capital", "soft-reverse", "base-b"]
    rows = [(m, f"member {m}") for m in order if f"member {m}" in report["scores"]["overall"]]
    rows += [("ensemble: PairRM's first (its policy)", "ensemble (policy)"), ("majority vote", "vote")]
    rows += [("oracle", "oracle")]
    skills = (*p.skills, "overall")
    sort = {m: _em(report, "sort", f"member {m}") for m in ("base-a", "lora-sort", "bn-sort", "prefix-sort")}
    cap = {m: _em(report, "capital", f"member {m}") for m in sort}
    lines = [
        "The demo's five members and two more, trained here on the sort skill over base A with the `adapters` "
        "library: a bottleneck adapter (bn-sort: `BnConfig` after attention and after the feed-forward, reduction "
        "factor 16, gelu) and prefix tuning (prefix-sort: `PrefixTuningConfig`, 16 trained keys and values per "
        "layer), both served by the gateway's adapter server (`config/demo.yaml`, ensemble "
        f"`{p.ensemble}`); {report['items']} held-out prompts. Trained on the suite's sort examples under the chat "
        "template with the schedule the LoRA members get (`ensemble-gateway train`: LoRA 200 steps at 3e-3, "
        "bottleneck 400 at 3e-3, prefix 400 at 5e-3; about 20 s each here).",
        "",
        *_table(report, skills, rows),
        "",
        f"On sort: LoRA {sort['lora-sort']:.1f}%, bottleneck {sort['bn-sort']:.1f}%, prefix tuning "
        f"{sort['prefix-sort']:.1f}%, base A {sort['base-a']:.1f}%. All three were trained on sort alone; on "
        f"capitals base A's {cap['base-a']:.1f}% becomes {cap['lora-sort']:.1f}% with the LoRA, "
        f"{cap['bn-sort']:.1f}% with the bottleneck adapter and {cap['prefix-sort']:.1f}% with prefix tuning (one "
        "seed and one setting each). Neither was trained for the mix that keeps the base's skills (FACTS.md: half "
        "the data from them).",
    ]
    if main is None:
        return lines
    five = _em(main, "overall", "ensemble (policy)")
    seven = _em(report, "overall", "ensemble (policy)")
    vote5, vote7 = _em(main, "overall", "vote"), _em(report, "overall", "vote")
    moved = ", ".join(
        f"{s} {_em(main, s, 'ensemble (policy)'):.1f} → {_em(report, s, 'ensemble (policy)'):.1f}"
        for s in p.skills
        if abs(_em(main, s, "ensemble (policy)") - _em(report, s, "ensemble (policy)")) >= 1.0
    )
    if seven < five:
        verdict = (
            "two more sort specialists, each below lora-sort on sort, give PairRM more wrong answers to choose "
            "from, and PairRM was trained on the five's answers only. So the demo keeps its five and serves these "
            f"two in `{p.ensemble}`; to make them full members, train PairRM on their answers too"
        )
    else:
        verdict = "the two new members add right answers PairRM can find"
    vote = f"The majority vote moves {vote5:.1f}% → {vote7:.1f}%" + (
        ": on sort, three members now agree on the right answer." if vote7 > vote5 else "."
    )
    lines += [
        "",
        f"With them the ensemble scores {seven:.1f}% against the demo's {five:.1f}% with five members "
        f"({seven - five:+.1f} points{': ' + moved if moved else ''}): {verdict}. {vote}",
    ]
    return lines
