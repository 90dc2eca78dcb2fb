"""``python -m bench.learning``: the learning loop measured (docs/QUALITY.md, "Learning from feedback").

The `with-adapters` ensemble (seven members; its PairRM was trained on five of them) is served as
`make demo` serves it, with a store. Training-suite prompts (training seed 600: never an evaluation
prompt, and not the seed the ranker was trained on) go through the gateway as a user's would, each
answer followed by its reference as feedback. After 100, 300 and 1,000 feedback events,
`ensemble-gateway retrain-ranker` runs as a cron job would (train from the store, compare on held-out
pairs, swap and reload only if better), and the 400 held-out prompts are evaluated through the same
gateway. Writes ``bench/results/learning.json``; ``python -m bench.quality`` puts it in QUALITY.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, commit, machine

logger = logging.getLogger("bench.learning")

STEPS = (100, 300, 1000)
ADMIN_KEY = "bench-learning-admin"
EXE = str(Path(sys.executable).with_name("ensemble-gateway"))


@contextlib.contextmanager
def served(config: Path, log: Path) -> Iterator[str]:
    from service.ops.launcher import free_port
    from tests.load import stop_process

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [EXE, "serve", "--config", str(config), "--port", str(port), "--log-dir", str(log.parent / "logs")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            time.sleep(1)
        yield url
    finally:
        stop_process(proc, timeout_s=60)


async def feed(url: str, ensemble: str, items: list[Any], concurrency: int) -> dict[str, int]:
    """Each item's prompt answered, then its reference sent as feedback; counts of what happened."""
    counts = {"answered": 0, "feedback": 0, "errors": 0}
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            item = queue.get_nowait()
            r = await client.post("/generate", json={"prompt": item.prompt, "ensemble": ensemble, "temperature": 0})
            if r.status_code != 200:
                counts["errors"] += 1
                continue
            counts["answered"] += 1
            fb = await client.post("/v1/feedback", json={"id": r.json()["id"], "reference": item.reference})
            counts["feedback" if fb.status_code == 200 else "errors"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return counts


def evaluate(url: str, suite: Path, ensemble: str, out: Path, concurrency: int) -> dict[str, Any]:
    done = subprocess.run(
        [EXE, "--log-level", "warning", "eval", str(suite), "--url", url, "--ensemble", ensemble,
         "--out", str(out), "--concurrency", str(concurrency), "--temperature", "0"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"eval failed: {done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    overall = report["scores"]["overall"]
    return {
        "ranker_first": overall["ranker first"]["exact_match"],
        "ensemble_policy": overall["ensemble (policy)"]["exact_match"],
        "oracle": overall["oracle"]["exact_match"],
        "by_skill": {t: report["scores"][t]["ensemble (policy)"]["exact_match"] for t in report["tags"]},
    }


def retrain(url: str, store: str, config: Path, ensemble: str, out: Path, fit: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [EXE, "--log-level", "warning", "retrain-ranker", "--from-store", store, "--config", str(config),
         "--ranker", "pairrm", "--ensemble", ensemble, "--out", str(out), "--gateway", url, *fit],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"retrain-ranker failed: {done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@dataclass(frozen=True)
class Setup:
    """A run's own folder: the held-out suite (written as JSONL), the users' prompts, a fresh store,
    and the config pointed at that store."""

    suite_path: Path
    items: list[Any]  # training-suite items, shuffled, ``feed`` of them
    store: str
    config: Path


def prepare(work: Path, config: Path, eval_seed: int, per_skill: int, seed: int, feed: int) -> Setup:
    from service.quality import suite

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    held_out = suite.eval_suite(eval_seed, per_skill)
    suite_path = work / "suite.jsonl"
    suite.write_jsonl(suite_path, held_out)
    items = suite.training_items(seed, -(-feed // len(suite.SKILLS)), exclude={i.prompt for i in held_out})
    random.Random(seed).shuffle(items)
    store = f"sqlite:///{work / 'store.db'}"
    text = config.read_text()
    if "\nstore: {}" not in text:
        raise SystemExit(f"{config}: expected `store: {{}}` to point at this run's own store")
    served_config = work / "gateway.yaml"
    served_config.write_text(text.replace("\nstore: {}", f"\nstore: {{url: '{store}'}}"))
    return Setup(suite_path, items[:feed], store, served_config)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work
    setup = prepare(work, args.config, args.eval_seed, args.per_skill, args.seed, max(args.feedback))
    suite_path, items, store, config = setup.suite_path, setup.items, setup.store, setup.config
    fit = ["--steps", str(args.train_steps), "--lr", str(args.lr), "--threads", str(args.threads)]
    rows: list[dict[str, Any]] = []
    with served(config, work / "gateway.log") as url:
        logger.info("baseline eval")
        rows.append({"feedback": 0, "retrain": None, **evaluate(url, suite_path, args.ensemble, work / "eval-0", 8)})
        compare = {name: evaluate(url, suite_path, name, work / f"eval-{name}", 8) for name in args.compare}
        fed = 0
        for n in args.feedback:
            logger.info("feeding %d..%d", fed, n)
            counts = asyncio.run(feed(url, args.ensemble, items[fed:n], args.concurrency))
            fed = n
            report = retrain(url, store, config, args.ensemble, work / "rankers", fit)
            logger.info("retrain after %d: %s", n, {k: report.get(k) for k in ("pairs", "swapped", "why")})
            scores = evaluate(url, suite_path, args.ensemble, work / f"eval-{n}", 8)
            logger.info("after %d feedback events: %s", n, scores)
            rows.append({"feedback": n, "fed": counts, "retrain": report, **scores})
    return {
        "date": dt.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "ensemble": args.ensemble,
        "feed_seed": args.seed,
        "suite": {"seed": args.eval_seed, "per_skill": args.per_skill},
        "train": {"steps": args.train_steps, "lr": args.lr, "threads": args.threads},
        "rows": rows,
        "compare": compare,
    }


def section(result: dict[str, Any] | None, demo_policy: float | None) -> list[str]:
    """QUALITY.md's section for the loop's figures; ``demo_policy``: the demo's figure in the main
    table (another run, perhaps another machine and checkpoints)."""
    if not result:
        return []
    rows = result["rows"]
    skills = list(rows[0]["by_skill"])
    lines = [
        "## Learning from feedback",
        "",
        f"The `{result['ensemble']}` ensemble served with a store; training-suite prompts (seed "
        f"{result['feed_seed']}, never an evaluation prompt) sent through the gateway as a user's, each answer "
        "followed by its reference as feedback (`POST /v1/feedback`); after each step `ensemble-gateway "
        f"retrain-ranker` ({result['train']['steps']} steps at lr {result['train']['lr']:g} from the ranker in "
        "service, on every feedback so far; swapped in only when its first choice is right more often on the "
        "held-out fifth of the feedback's prompts, or as often with more held-out pairs right), then the 400 "
        "held-out evaluation prompts through the same "
        "gateway (exact match, %).",
        "",
        "| feedback events | pairs | swapped (held-out first choice right, before → after) | "
        + " | ".join(skills)
        + " | ensemble | ranker first |",
        "|---" * (len(skills) + 5) + "|",
    ]
    for r in rows:
        re = r["retrain"] or {}
        t1 = (re.get("trained") or {}).get("heldout_top1") or {}
        swap = "-" if not re else ("yes" if re.get("swapped") else "no")
        if t1.get("before") is not None and t1.get("after") is not None:
            swap += f" ({t1['before']:.3f} → {t1['after']:.3f} on {t1['lists']})"
        lines.append(
            f"| {r['feedback']} | {re.get('pairs', '-')} | {swap} | "
            + " | ".join(f"{r['by_skill'][s]:.1f}" for s in skills)
            + f" | {r['ensemble_policy']:.1f} | {r['ranker_first']:.1f} |"
        )
    for name, scores in (result.get("compare") or {}).items():
        skills_text = ", ".join(f"{s} {v:.1f}" for s, v in scores["by_skill"].items())
        how = scores.get("how") or "in the same run (same gateway, checkpoints and prompts)"
        text = f"The `{name}` ensemble {how}: {scores['ensemble_policy']:.1f} ({skills_text})."
        if demo_policy is not None:
            text += f" The main table above (its own run) has {demo_policy:.1f}."
        lines += ["", text]
    m = result.get("machine") or {}
    lines += [
        "",
        f"Run {result['date']} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, commit `{result['commit']}`, "
        "with the checkpoints `make models` trained on that machine: its first row is the baseline to compare "
        "with; the sections above may come from another run (see Reproduce), on checkpoints trained elsewhere.",
        "",
        "`python -m bench.learning` (in `make quality`) reproduces it.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    parser.add_argument("--ensemble", default="with-adapters")
    parser.add_argument("--seed", type=int, default=600, help="the training seed of the users' prompts")
    parser.add_argument("--eval-seed", type=int, default=1_000_001)
    parser.add_argument("--per-skill", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--feedback", type=lambda v: [int(x) for x in v.split(",")], default=list(STEPS), help="e.g. 100,300,1000"
    )
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compare", type=lambda v: [x for x in v.split(",") if x], default=["demo"], help="ensembles evaluated once"
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "quality" / "learning")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "learning.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for line in section(result, None):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
