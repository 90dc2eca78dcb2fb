"""``python -m bench.routing``: fewer member calls per answer, measured (docs/QUALITY.md, "Routing").

The demo config is served as `make demo` serves it, with a store. Training-suite prompts (seed 600:
never an evaluation prompt) go through the seven-member `with-adapters` ensemble as a user's would,
each answer followed by its reference as feedback; `ensemble-gateway train-router --from-store`
trains a router on the demo PairRM's encoder (both kinds measured on held-out sources, the better
kept). The config then gains the router, a seeded random router and a routed copy of `demo` and of
`with-adapters` per method (reloaded through the admin API: the vLLM servers stay up), and the 400
held-out prompts go through each, the ensemble's own fusion policy in force, 8 in flight:

- every member (the ensemble itself); the demo's own `routed` ensemble (route m = 1, its router made by
  `ensemble-gateway train` from the recipe's candidates); route m = 1, 2, 3; cascade (2 first) at three margins; a
  random m = 2 (the baseline); the oracle router (a member whose answer is right, known in advance:
  the limit, read off the every-member run's candidates, not served).

Each row: exact match, mean member calls per answer, median gateway time per request. Writes
``bench/results/routing.json`` and ``docs/quality-routing.png``; ``python -m bench.quality`` puts
the section in QUALITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.common import ROOT, commit, machine
from bench.learning import ADMIN_KEY, EXE, feed, prepare, served

logger = logging.getLogger("bench.routing")

ENSEMBLES = ("demo", "with-adapters")
MARGINS = (0.5, 1.0, 2.0)
CALL_SHARE = 0.4  # the goal: at most this share of the full ensemble's member calls ...
ACCURACY_SHARE = 0.98  # ... for at least this share of its accuracy
CHART = ROOT / "docs" / "quality-routing.png"


def variants(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The routed copies of one ensemble, by method label."""
    routed = {**base, "router": "store-router"}
    out: dict[str, dict[str, Any]] = {}
    for m in (1, 2, 3):
        out[f"route m={m}"] = {**routed, "route": {"members": m}}
    for margin in MARGINS:
        out[f"cascade 2, margin {margin:g}"] = {**routed, "cascade": {"members": 2, "margin": margin}}
    out["random m=2"] = {**base, "router": "random", "route": {"members": 2}}
    return out


def slug(ensemble: str, method: str) -> str:
    return f"{ensemble}--{method.replace(' ', '-').replace('=', '').replace(',', '').replace('.', '_')}"


async def observe(url: str, items: list[Any], ensemble: str, concurrency: int) -> list[Any]:
    from service.quality.evaluate import Observation, Settings, run

    out: list[Observation] = []
    settings = Settings(ensemble=ensemble, concurrency=concurrency, temperature=0.0, fusion=None)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await run(client, items, settings, out)
    return out


def scored(observations: list[Any]) -> dict[str, Any]:
    """Exact match of the answer (the ensemble's policy), calls per answer, p50 ms, by skill."""
    from service.quality.report import exact

    ok = [o for o in observations if o.error is None]
    tags = sorted({o.item.tag for o in ok})
    em = [exact(o.output, o.item.reference) for o in ok]
    return {
        "answered": len(ok),
        "errors": len(observations) - len(ok),
        "exact_match": round(100 * statistics.fmean(em), 2) if ok else 0.0,
        "by_skill": {
            t: round(100 * statistics.fmean([e for e, o in zip(em, ok, strict=True) if o.item.tag == t]), 2)
            for t in tags
        },
        "calls": round(statistics.fmean(o.calls for o in ok), 3) if ok else 0.0,
        "p50_ms": round(statistics.median(o.latency_ms for o in ok), 1) if ok else 0.0,
    }


def oracle(observations: list[Any]) -> dict[str, Any]:
    """The limit: a router that knows a member whose answer is right (one call; any member if none is)."""
    from service.quality.report import exact

    ok = [o for o in observations if o.error is None]
    right = [max((exact(c.text, o.item.reference) for c in o.candidates), default=0.0) for o in ok]
    tags = sorted({o.item.tag for o in ok})
    return {
        "answered": len(ok),
        "errors": 0,
        "exact_match": round(100 * statistics.fmean(right), 2),
        "by_skill": {
            t: round(100 * statistics.fmean([r for r, o in zip(right, ok, strict=True) if o.item.tag == t]), 2)
            for t in tags
        },
        "calls": 1.0,
        "p50_ms": None,
    }


def train_router(store: str, encoder: str, out: Path, ensemble: str) -> dict[str, Any]:
    done = subprocess.run(
        [EXE, "--log-level", "warning", "train-router", "--from-store", store, "--ensemble", ensemble,
         "--encoder", encoder, "--out", str(out), "--feedback-only"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"train-router failed: {done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def reload(url: str, config: Path, data: dict[str, Any]) -> dict[str, Any]:
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    r = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=900)
    if r.status_code != 200:
        raise RuntimeError(f"reload failed: {r.text[:2000]}")
    changes: dict[str, Any] = r.json()
    return changes


def goal(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The best served method within the call budget, and whether it keeps the accuracy share."""
    full = rows["every member"]
    budget = CALL_SHARE * full["calls"]
    served_rows = {k: v for k, v in rows.items() if v["p50_ms"] is not None and k != "every member"}
    within = {k: v for k, v in served_rows.items() if v["calls"] <= budget and not k.startswith("random")}
    best = max(within, key=lambda k: within[k]["exact_match"], default=None)
    if best is None:
        return {"method": None, "met": False, "budget_calls": round(budget, 3)}
    share = within[best]["exact_match"] / full["exact_match"] if full["exact_match"] else 0.0
    return {
        "method": best,
        "calls_share": round(within[best]["calls"] / full["calls"], 3),
        "accuracy_share": round(share, 4),
        "budget_calls": round(budget, 3),
        "met": share >= ACCURACY_SHARE,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from service.config import load_config
    from service.quality.dataset import read_dataset

    work: Path = args.work
    setup = prepare(work, args.config, args.eval_seed, args.per_skill, args.seed, args.feedback)
    items, store, config = setup.items, setup.store, setup.config
    eval_items = read_dataset(setup.suite_path).items
    data = yaml.safe_load(config.read_text())
    encoder = load_config(config).local_ranker("pairrm").checkpoint
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "feed": {"ensemble": args.train_ensemble, "seed": args.seed, "prompts": len(items)},
        "suite": {"seed": args.eval_seed, "per_skill": args.per_skill, "prompts": len(eval_items)},
        "concurrency": args.concurrency,
        "ensembles": {},
    }
    with served(config, work / "gateway.log") as url:
        logger.info("feeding %d training prompts through %s", len(items), args.train_ensemble)
        result["feed"]["counts"] = asyncio.run(feed(url, args.train_ensemble, items, args.concurrency))
        result["router"] = train_router(store, encoder, work / "router", args.train_ensemble)
        logger.info("router: %s", {k: result["router"].get(k) for k in ("kind", "heldout")})
        data.setdefault("routers", {}).update(
            {"store-router": {"checkpoint": str(work / "router")}, "random": {"kind": "random"}}
        )
        names: dict[tuple[str, str], str] = {}
        for ens in args.ensembles:
            names[(ens, "every member")] = ens
            if ens == "demo" and "routed" in data["ensembles"]:  # the demo's own, its router from training
                names[(ens, "route m=1, recipe's router")] = "routed"
            for method, cfg in variants(data["ensembles"][ens]).items():
                names[(ens, method)] = slug(ens, method)
                data["ensembles"][slug(ens, method)] = {**cfg, "store": False}
        reload(url, config, data)
        for ens in args.ensembles:
            rows: dict[str, dict[str, Any]] = {}
            for (e, method), name in names.items():
                if e != ens:
                    continue
                logger.info("%s: %s", ens, method)
                observations = asyncio.run(observe(url, eval_items, name, args.concurrency))
                rows[method] = scored(observations)
                if method == "every member":
                    rows["oracle router"] = oracle(observations)
                logger.info("%s %s: %s", ens, method, {k: rows[method][k] for k in ("exact_match", "calls", "p50_ms")})
            result["ensembles"][ens] = {"members": len(data["ensembles"][ens]["members"]), "rows": rows,
                                        "goal": goal(rows)}  # fmt: skip
    return result


def chart(result: dict[str, Any], path: Path) -> None:
    """Per ensemble: exact match (top) and median ms per request (bottom) against member calls per
    answer; each method its own marker, named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = result["ensembles"]
    fig, axes = plt.subplots(2, len(blocks), figsize=(6.2 * len(blocks), 8), squeeze=False, sharex="col")
    colors = [plt.get_cmap("tab10")(k) for k in range(10)]
    for col, (ens, block) in enumerate(blocks.items()):
        acc, lat = axes[0][col], axes[1][col]
        full = block["rows"]["every member"]
        for k, (method, row) in enumerate(block["rows"].items()):
            marker = {"every member": "*", "oracle router": "P", "random m=2": "X"}.get(
                method, "o" if "route" in method else "s"
            )
            style = {"marker": marker, "s": 90 if marker == "*" else 55, "color": colors[k % 10], "label": method}
            acc.scatter(row["calls"], row["exact_match"], **style)
            if row["p50_ms"] is not None:
                lat.scatter(row["calls"], row["p50_ms"], **style)
        for ax in (acc, lat):
            ax.axvline(CALL_SHARE * full["calls"], color="grey", lw=0.8, ls="--")
            ax.grid(alpha=0.3)
            ax.set_xlim(0, block["members"] + 0.5)
        acc.axhline(ACCURACY_SHARE * full["exact_match"], color="grey", lw=0.8, ls=":")
        acc.set_title(f"{ens} ({block['members']} members)")
        acc.set_ylabel("exact match (%)")
        lat.set_ylabel(f"median ms per request ({result['concurrency']} in flight)")
        lat.set_xlabel("member calls per answer (mean)")
        acc.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"Routing: {result['suite']['prompts']} held-out prompts (dashed: {CALL_SHARE:.0%} of the calls; "
        f"dotted: {ACCURACY_SHARE:.0%} of the every-member accuracy)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(result: dict[str, Any] | None) -> list[str]:
    """QUALITY.md's section (empty when bench.routing has not run)."""
    if not result:
        return []
    r = result["router"]
    lines = [
        "## Routing: fewer member calls",
        "",
        f"A router trained by `ensemble-gateway train-router --from-store` on {result['feed']['prompts']} answers of "
        f"`{result['feed']['ensemble']}` with feedback (training-suite prompts, seed {result['feed']['seed']}, each "
        "answer's reference sent as feedback): the demo PairRM's encoder embeds the source; a kNN and a logistic head "
        f"were measured on the held-out fifth of the sources, the member each ranks first right: "
        + ", ".join(f"{k} {100 * v['top1']:.1f}%" for k, v in r["heldout"].items())
        + f" (a random member {100 * next(iter(r['heldout'].values()))['random']:.1f}%); `{r['kind']}` kept.",
        "",
        f"Then the {result['suite']['prompts']} held-out evaluation prompts through each method, the "
        f"ensemble's own fusion policy, {result['concurrency']} in flight (median gateway time per request under that "
        "load; 2 cores shared with the vLLM servers). Cascade: the router's first 2 members, then the rest when the "
        "ranker's top candidate leads the best different one by less than the margin. The oracle router is read off "
        "the every-member run (a member whose answer is right, known in advance): the limit, not served. "
        "`route m=1, recipe's router` is the demo's own `routed` ensemble: its router was made by `ensemble-gateway "
        "train` (in `make models`) from the members' answers to the training prompts, not from the store.",
        "",
        f"![Routing]({CHART.name})",
        "",
    ]
    for ens, block in result["ensembles"].items():
        rows = block["rows"]
        skills = list(next(iter(rows.values()))["by_skill"])
        lines += [
            f"### {ens} ({block['members']} members)",
            "",
            "| method | "
            + " | ".join(skills)
            + " | exact match (%) | member calls per answer | share of calls | p50 ms |",
            "|---|" + "---|" * (len(skills) + 4),
        ]
        full = rows["every member"]
        for method, row in rows.items():
            p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}"
            lines.append(
                f"| {method} | "
                + " | ".join(f"{row['by_skill'][s]:.1f}" for s in skills)
                + f" | {row['exact_match']:.1f} | {row['calls']:.2f} | {row['calls'] / full['calls']:.0%} | {p50} |"
            )
        g = block["goal"]
        if g["method"] is None:
            verdict = f"no served method stays within {CALL_SHARE:.0%} of the calls"
        else:
            verdict = (
                f"best within {CALL_SHARE:.0%} of the calls ({g['budget_calls']:.2f} per answer): {g['method']}, "
                f"{100 * g['accuracy_share']:.1f}% of the every-member accuracy with {100 * g['calls_share']:.0f}% of "
                f"its calls (goal {ACCURACY_SHARE:.0%}: {'met' if g['met'] else 'missed'})"
            )
        lines += ["", f"Goal: {verdict}.", ""]
    lines += [
        f"Run {result['date']} on {result['machine']['cpu']}, {result['machine']['cores']} cores, commit "
        f"`{result['commit']}`; `python -m bench.routing` reproduces it (in `make quality`).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    parser.add_argument("--train-ensemble", default="with-adapters", help="the ensemble the feedback goes through")
    parser.add_argument("--ensembles", type=lambda v: [x for x in v.split(",") if x], default=list(ENSEMBLES))
    parser.add_argument("--feedback", type=int, default=400, help="training prompts answered with feedback")
    parser.add_argument("--seed", type=int, default=600, help="the training seed of the users' prompts")
    parser.add_argument("--eval-seed", type=int, default=1_000_001)
    parser.add_argument("--per-skill", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "quality" / "routing")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--from-json", action="store_true", help="only redraw the chart and section from --json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.from_json:
        result = json.loads(args.json.read_text())
    else:
        result = run(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    chart(result, args.chart)
    for line in section(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
