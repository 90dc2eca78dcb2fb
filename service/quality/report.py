"""Scores of an eval run, per tag and overall: each member, a random member, the best single member,
the ranker's first choice, the fused answer, the ensemble's own policy, adaptive fusion replayed at
several margins, and the oracle (any candidate right). Exact match after ``normalize``; sacrebleu's
chrF and BLEU for free-form references; optionally a PairRM judge's win rate of the ensemble's answer
against each member's. Written as a terminal table, JSON, markdown and a bar chart (PNG).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.pipeline.voting import vote
from service.quality.evaluate import Observation
from service.quality.suite import normalize

# (source, answer, other) -> 1 if the answer wins, 0.5 a tie, 0 a loss
Judge = Callable[[str, str, str], float]


@dataclass(frozen=True)
class Policy:
    """The ensemble's own fusion policy, to replay: ``always``, ``never`` or ``adaptive`` at ``margin``."""

    fusion: str = "always"
    margin: float = 1.0


def exact(answer: str | None, reference: str, tag: str | None = None) -> float:
    """1 if the answer matches the reference after ``normalize`` (by parts for a compound ``tag``)."""
    return 1.0 if answer is not None and normalize(answer, tag) == normalize(reference, tag) else 0.0


def _chrf(answer: str | None, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(answer or "", [reference]).score)


def _bleu(answers: Sequence[str | None], references: Sequence[str]) -> float:
    import sacrebleu

    if not answers:
        return 0.0
    return float(sacrebleu.corpus_bleu([a or "" for a in answers], [list(references)]).score)


def members_of(observations: Sequence[Observation]) -> list[str]:
    seen: dict[str, None] = {}
    for o in observations:
        for c in o.candidates:
            seen.setdefault(c.member, None)
    return list(seen)


def adaptive_answer(o: Observation, margin: float) -> tuple[str | None, bool]:
    """The answer adaptive fusion would give at ``margin``, and whether it skips the fuser."""
    lead = o.margin
    if lead is not None and lead >= margin:
        return o.first, True
    return o.output, False


def _answers(o: Observation, policy: Policy) -> dict[str, str | None]:
    out: dict[str, str | None] = {f"member {c.member}": c.text for c in o.candidates}
    out["ranker first"] = o.first
    if o.candidates:
        # Candidates come best first by the ranker, so the vote's tie-break (score) is the ranker's.
        texts = [c.text for c in o.candidates]
        out["vote"] = texts[vote(texts, [c.score for c in o.candidates]).winner]
    out["fused (always)"] = o.output
    if policy.fusion == "never":
        out["ensemble (policy)"] = o.first
    elif policy.fusion == "adaptive":
        out["ensemble (policy)"] = adaptive_answer(o, policy.margin)[0]
    else:
        out["ensemble (policy)"] = o.output
    return out


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _score_group(obs: Sequence[Observation], members: list[str], policy: Policy) -> dict[str, dict[str, float]]:
    refs = [o.item.reference for o in obs]
    tags = [o.item.tag for o in obs]
    methods = [f"member {m}" for m in members] + ["ranker first", "vote", "fused (always)", "ensemble (policy)"]
    per: dict[str, list[str | None]] = {name: [] for name in methods}
    for o in obs:
        picked = _answers(o, policy)
        for name in methods:
            per[name].append(picked.get(name))
    out: dict[str, dict[str, float]] = {}
    for name, answers in per.items():
        pairs = list(zip(answers, refs, strict=True))
        out[name] = {
            "exact_match": 100 * _mean([exact(a, r, t) for (a, r), t in zip(pairs, tags, strict=True)]),
            "chrf": _mean([_chrf(a, r) for a, r in pairs]),
            "bleu": _bleu(answers, refs),
        }
    cands = [([c.text for c in o.candidates], o.item.reference, o.item.tag) for o in obs]
    out["random member"] = {
        "exact_match": 100 * _mean([_mean([exact(t, r, g) for t in ts]) for ts, r, g in cands]),
        "chrf": _mean([_mean([_chrf(t, r) for t in ts]) for ts, r, _ in cands]),
    }
    out["oracle"] = {
        "exact_match": 100 * _mean([max((exact(t, r, g) for t in ts), default=0.0) for ts, r, g in cands]),
        "chrf": _mean([max((_chrf(t, r) for t in ts), default=0.0) for ts, r, _ in cands]),
    }
    return out


def build_report(
    observations: Sequence[Observation],
    policy: Policy = Policy(),
    margins: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    judge: Judge | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole report as plain data (what the JSON file holds)."""
    answered = [o for o in observations if o.error is None]
    members = members_of(answered)
    tags = sorted({o.item.tag for o in answered})
    groups = {"overall": answered, **{t: [o for o in answered if o.item.tag == t] for t in tags}}
    scores = {g: _score_group(obs, members, policy) for g, obs in groups.items() if obs}
    overall = scores.get("overall", {})
    best = max(members, key=lambda m: overall[f"member {m}"]["exact_match"], default=None)
    if best is not None:
        for g in scores:
            scores[g]["best single member"] = dict(scores[g][f"member {best}"])
    adaptive = []
    for m in margins:
        picks = [adaptive_answer(o, m) for o in answered]
        adaptive.append(
            {
                "margin": m,
                "skip_rate": 100 * statistics.fmean(skip for _, skip in picks) if picks else 0.0,
                "exact_match": 100
                * statistics.fmean(
                    exact(a, o.item.reference, o.item.tag) for (a, _), o in zip(picks, answered, strict=True)
                )
                if picks
                else 0.0,
            }
        )
    report: dict[str, Any] = {
        **(meta or {}),
        "items": len(observations),
        "answered": len(answered),
        "errors": [{"line": o.item.line, "error": o.error} for o in observations if o.error is not None],
        "members": members,
        "best_member": best,
        "policy": {"fusion": policy.fusion, "margin": policy.margin},
        "tags": tags,
        "scores": scores,
        "adaptive": adaptive,
        "latency_ms_p50": statistics.median([o.latency_ms for o in answered]) if answered else None,
    }
    if judge is not None and answered:
        report["judge_win_rate"] = {
            m: 100
            * statistics.fmean(
                judge(o.item.source, o.output, other) if (other := o.answer_of(m)) is not None else 1.0
                for o in answered
            )
            for m in members
        }
    return report


def preference_pairs(observations: Sequence[Observation]) -> list[dict[str, str]]:
    """``{source, chosen, rejected}`` from the members' own candidates where the reference tells a
    right one from a wrong one: training data for ``ensemble-gateway train-ranker``."""
    pairs = []
    for o in observations:
        right = {c.text for c in o.candidates if exact(c.text, o.item.reference, o.item.tag)}
        wrong = {c.text for c in o.candidates if not exact(c.text, o.item.reference, o.item.tag)}
        pairs += [{"source": o.item.source, "chosen": r, "rejected": w} for r in sorted(right) for w in sorted(wrong)]
    return pairs


ORDER = (
    "best single member",
    "random member",
    "ranker first",
    "vote",
    "fused (always)",
    "ensemble (policy)",
    "oracle",
)


def _rows(report: dict[str, Any]) -> list[str]:
    overall = report["scores"].get("overall", {})
    return [*(f"member {m}" for m in report["members"]), *(n for n in ORDER if n in overall)]


def table(report: dict[str, Any]) -> str:
    """Exact match (%) per method, by tag and overall, as fixed-width text."""
    cols = [*report["tags"], "overall"]
    rows = _rows(report)
    width = max([len(r) for r in rows] + [6])
    lines = [" " * width + "".join(f"{c:>10}" for c in cols)]
    for r in rows:
        cells = "".join(
            f"{report['scores'][c][r]['exact_match']:>10.1f}" if c in report["scores"] else f"{'-':>10}" for c in cols
        )
        lines.append(f"{r:<{width}}{cells}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    cols = [*report["tags"], "overall"]
    out = ["| method | " + " | ".join(cols) + " | chrF (overall) |", "|---" * (len(cols) + 2) + "|"]
    for r in _rows(report):
        cells = [f"{report['scores'][c][r]['exact_match']:.1f}" for c in cols]
        out.append(f"| {r} | " + " | ".join(cells) + f" | {report['scores']['overall'][r]['chrf']:.1f} |")
    out += [
        "",
        "Adaptive fusion replayed (fusion forced on for the eval, the ranker's lead decides):",
        "",
        "| margin | skips fusion (%) | exact match |",
        "|---|---|---|",
    ]
    out += [f"| {a['margin']:g} | {a['skip_rate']:.1f} | {a['exact_match']:.1f} |" for a in report["adaptive"]]
    if "judge_win_rate" in report:
        out += [
            "",
            "PairRM judge: the ensemble's answer against each member's (win = 1, tie = 0.5):",
            "",
            "| member | win rate (%) |",
            "|---|---|",
        ]
        out += [f"| {m} | {w:.1f} |" for m, w in report["judge_win_rate"].items()]
    return "\n".join(out) + "\n"


def chart(report: dict[str, Any], path: Path, title: str = "Exact match by skill") -> None:
    """Grouped bars: one group per tag (and overall), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*report["tags"], "overall"]
    rows = _rows(report)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cols) * max(1, len(rows)) / 6), 4.8))
    width = 0.8 / max(1, len(rows))
    # tab20 keeps up to 20 methods apart (the default cycle repeats after 10: a member and the oracle
    # came out the same blue); members get the light shades, the ensemble's methods the dark ones.
    palette = [plt.get_cmap("tab20")(i) for i in range(20)]
    members = [r for r in rows if r.startswith("member ")]
    for k, r in enumerate(rows):
        values = [report["scores"][c][r]["exact_match"] if c in report["scores"] else 0.0 for c in cols]
        shade = 2 * k + 1 if r in members else 2 * (k - len(members))
        ax.bar([i + k * width for i in range(len(cols))], values, width, label=r, color=palette[shade % 20])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))], cols)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """report.json, report.md and chart.png under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "chart": out_dir / "chart.png"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["markdown"].write_text(markdown(report))
    chart(report, paths["chart"])
    return paths
