"""The quality commands behind ``ensemble-gateway eval`` (argument parsing stays in ``service.cli``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import httpx

from service.quality.dataset import read_dataset
from service.quality.evaluate import Observation, Settings, gateway_client, run
from service.quality.report import Judge, Policy, build_report, preference_pairs, table, write
from service.quality.suite import normalize


async def _policy(client: httpx.AsyncClient, ensemble: str | None, headers: dict[str, str]) -> tuple[str, Policy]:
    """The ensemble's name and fusion policy, from the gateway's /status.json."""
    resp = await client.get("/status.json", headers=headers)
    resp.raise_for_status()
    status: dict[str, Any] = resp.json()
    name = ensemble or str(status["default_ensemble"])
    if name not in status["ensembles"]:
        raise SystemExit(f"ensemble-gateway eval: the gateway has no ensemble {name!r} ({sorted(status['ensembles'])})")
    ens = status["ensembles"][name]
    return name, Policy(str(ens.get("fusion", "always")), float(ens.get("fusion_margin", 1.0)))


def pairrm_judge(checkpoint: str) -> Judge:
    """A PairRM (the gateway's own ranker code) as a judge of two answers to one source."""
    from service.config import RankerConfig
    from service.models.rankers.pairrm import PairRMRanker

    ranker = PairRMRanker("judge", RankerConfig(checkpoint=checkpoint))

    def judge(source: str, answer: str, other: str) -> float:
        if normalize(answer) == normalize(other):
            return 0.5
        a, b = ranker.rank_sync(source, [answer, other]).scores
        return 1.0 if a > b else 0.0 if a < b else 0.5

    return judge


def run_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    data = read_dataset(args.dataset)
    for line, why in data.bad_lines:
        print(f"{args.dataset}:{line}: skipped: {why}", file=sys.stderr)
    if not data.items:
        print(f"ensemble-gateway eval: no usable line in {args.dataset}", file=sys.stderr)
        return 2
    settings = Settings(
        ensemble=args.ensemble,
        concurrency=max(1, args.concurrency),
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        api_key=args.api_key or os.environ.get("GATEWAY_API_KEY"),
    )
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    observations: list[Observation] = []
    found: dict[str, Any] = {}
    bar = tqdm(total=len(data.items), desc="eval", unit="prompt", mininterval=0.5)

    def done(o: Observation) -> None:
        bar.update(1)
        bar.set_postfix(errors=sum(x.error is not None for x in observations), refresh=False)

    async def main() -> None:
        async with gateway_client(args.url, args.config, args.timeout) as client:
            found["ensemble"], found["policy"] = await _policy(client, settings.ensemble, headers)
            await run(client, data.items, settings, observations, on_done=done)

    partial = False
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        partial = True
        print(f"\ninterrupted: reporting the {len(observations)} prompts answered so far", file=sys.stderr)
    finally:
        bar.close()
    margins = [float(m) for m in args.margins.split(",") if m.strip()]
    judge = pairrm_judge(str(args.judge)) if args.judge is not None and observations else None
    meta = {
        "dataset": str(args.dataset),
        "target": args.url or str(args.config),
        "ensemble": found.get("ensemble"),
        "partial": partial,
        "bad_lines": [{"line": n, "why": w} for n, w in data.bad_lines],
        "temperature": settings.temperature,
    }
    report = build_report(observations, found.get("policy", Policy()), margins, judge, meta)
    paths = write(report, args.out)
    print(table(report))
    if report["errors"]:
        print(f"{len(report['errors'])} requests failed (see {paths['json']})", file=sys.stderr)
    if args.pairs_out is not None:
        pairs = preference_pairs([o for o in observations if o.error is None])
        args.pairs_out.parent.mkdir(parents=True, exist_ok=True)
        args.pairs_out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        print(f"{len(pairs)} preference pairs: {args.pairs_out}")
    if args.records_out is not None:
        args.records_out.parent.mkdir(parents=True, exist_ok=True)
        rows = [o.record() for o in observations if o.error is None]
        args.records_out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{len(rows)} records: {args.records_out}")
    print(f"report: {paths['markdown']}, {paths['json']}, {paths['chart']}")
    return 130 if partial else 0
