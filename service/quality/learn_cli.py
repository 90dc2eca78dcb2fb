"""The learning commands: ``train-ranker`` (from JSONL or from the store), ``train-fuser``, ``train-router``,
``export`` (the store as JSONL) and ``retrain-ranker`` (the whole loop). Heavy imports wait until a command runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any


def _fit(args: argparse.Namespace) -> Any:
    from service.quality.lm import FineTune

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return FineTune(steps=args.steps, lr=args.lr, seed=args.seed, batch=args.batch, warmup=args.warmup)


def cmd_train_ranker(args: argparse.Namespace) -> int:
    from service.quality.learn import gather_pairs, read_store
    from service.quality.train_ranker import fine_tune, fine_tune_pairs

    fit = _fit(args)
    try:
        if args.from_store:
            gathered = gather_pairs(asyncio.run(read_store(args.from_store, args.ensemble)), args.chrf_threshold)
            if not gathered.pairs:
                raise ValueError(f"no usable feedback in the store ({gathered.answers} answers with feedback)")
            result = fine_tune_pairs(args.checkpoint, gathered.pairs, args.out, fit, args.heldout, gathered.choices)
            result["store"] = {"answers_with_feedback": gathered.answers, "skipped_hashed": gathered.skipped_hashed}
        else:
            result = fine_tune(args.checkpoint, args.data, args.out, fit, args.heldout)
            for bad in result["bad_lines"]:
                print(f"{args.data}:{bad['line']}: skipped: {bad['why']}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"ensemble-gateway train-ranker: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from service.quality.learn import export, read_store

    counts = export(asyncio.run(read_store(args.from_store, args.ensemble)), args.out, args.chrf_threshold)
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from service.quality.retrain import Loop, run

    loop = Loop(
        store=args.from_store,
        config=args.config,
        ranker=args.ranker,
        out=args.out,
        gateway=args.gateway,
        admin_key=os.environ.get(args.admin_key_env) if args.admin_key_env else None,
        ensemble=args.ensemble,
        min_pairs=args.min_pairs,
        min_gain=args.min_gain,
        heldout=args.heldout,
        chrf_threshold=args.chrf_threshold,
    )
    try:
        report = run(loop, _fit(args))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"ensemble-gateway retrain-ranker: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    from service.quality.learn import read_store
    from service.quality.train_router import examples_of, read_records, train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.from_store:
            answered = asyncio.run(read_store(args.from_store, args.ensemble, unrated=True))
        else:
            answered = read_records(args.data)
        examples = examples_of(answered, args.chrf_threshold, feedback_only=args.feedback_only)
        result = train(examples, str(args.encoder), args.out, args.kind, args.k, args.heldout, args.seed)
    except (OSError, ValueError) as e:
        print(f"ensemble-gateway train-router: {e}", file=sys.stderr)
        return 2
    result["answers"] = len(answered)
    print(json.dumps(result, indent=1))
    return 0


def cmd_train_fuser(args: argparse.Namespace) -> int:
    from service.quality.learn import read_store
    from service.quality.lm import FineTune
    from service.quality.train_fuser import fine_tune, read_examples, store_examples

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    fit = FineTune(steps=args.steps, lr=args.lr, seed=args.seed, batch=args.batch, warmup=args.warmup)
    bad: list[tuple[int, str]] = []
    try:
        if args.from_store:
            examples = store_examples(asyncio.run(read_store(args.from_store, args.ensemble)), args.top_k)
            if not examples:
                raise ValueError("no stored answer has a reference in its feedback")
        else:
            examples, bad = read_examples(args.data)
            for number, why in bad:
                print(f"{args.data}:{number}: skipped: {why}", file=sys.stderr)
        result = fine_tune(args.checkpoint, examples, args.out, fit, args.heldout)
    except (OSError, ValueError) as e:
        print(f"ensemble-gateway train-fuser: {e}", file=sys.stderr)
        return 2
    result["bad_lines"] = [{"line": n, "why": w} for n, w in bad]
    print(json.dumps(result, indent=1))
    return 0


def _training(p: argparse.ArgumentParser, steps: int, lr: float = 3e-5, batch_help: str | None = None) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument(
        "--batch", type=int, default=16, help=batch_help or "comparisons per step (a pair gives two, one per order)"
    )
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads")


def _store(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--from-store", required=required, metavar="URL", help="the store's URL (sqlite:///... or postgresql://...)"
    )
    p.add_argument("--ensemble", help="only this ensemble's answers")
    p.add_argument("--chrf-threshold", type=float, default=80.0, help="chrF at which free text matches a reference")


def add_commands(sub: Any) -> None:
    tr = sub.add_parser(
        "train-ranker",
        help="fine-tune a PairRM-hf checkpoint on preference pairs; writes a checkpoint the gateway serves",
        description="Fine-tune any PairRM-hf checkpoint with llm-blender's pairwise objective on JSONL preferences "
        "({source, chosen, rejected}, or {source, candidates, ranks} with 1 = best) or on the feedback in the "
        "gateway's store; report the held-out pairwise accuracy before and after. `ensemble-gateway eval "
        "--pairs-out` makes such pairs from an ensemble's own candidates.",
    )
    tr.add_argument("--checkpoint", type=Path, required=True, help="the PairRM-hf directory to start from")
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="JSONL preferences")
    tr.add_argument("--out", type=Path, required=True, help="where the fine-tuned checkpoint goes")
    tr.add_argument("--heldout", type=float, default=0.1, help="share of sources kept aside (default 0.1)")
    _training(tr, 300)
    source.add_argument("--from-store", metavar="URL", help="the store's URL: pairs from its feedback")
    tr.add_argument("--ensemble", help="with --from-store: only this ensemble's answers")
    tr.add_argument("--chrf-threshold", type=float, default=80.0, help="chrF at which free text matches a reference")
    tr.set_defaults(func=cmd_train_ranker)

    tf = sub.add_parser(
        "train-fuser",
        help="fine-tune a GenFuser checkpoint on fusion examples; writes a checkpoint the gateway serves",
        description="Fine-tune any GenFuser (seq2seq) checkpoint, the published llm-blender/gen_fuser_3b or one of "
        "ours, on JSONL examples ({instruction, input, candidates (the ranker's order, best first), target}) or on "
        "the store's answers whose feedback gave a reference; report exact match and chrF of the fused texts on "
        "held-out inputs before and after.",
    )
    tf.add_argument("--checkpoint", type=Path, required=True, help="the GenFuser directory to start from")
    fsrc = tf.add_mutually_exclusive_group(required=True)
    fsrc.add_argument("--data", type=Path, help="JSONL fusion examples")
    fsrc.add_argument("--from-store", metavar="URL", help="the store's URL: answers with a reference in their feedback")
    tf.add_argument("--ensemble", help="with --from-store: only this ensemble's answers")
    tf.add_argument("--top-k", type=int, default=3, help="with --from-store: candidates per example (default 3)")
    tf.add_argument("--out", type=Path, required=True, help="where the fine-tuned checkpoint goes")
    tf.add_argument("--heldout", type=float, default=0.1, help="share of inputs kept aside (default 0.1)")
    _training(tf, 300, lr=1e-4, batch_help="examples per step")
    tf.set_defaults(func=cmd_train_fuser)

    ro = sub.add_parser(
        "train-router",
        help="train a router (which members to call) from the answers in the store; writes a checkpoint",
        description="Each stored answer is an example: its source, and for each member that answered whether its "
        "candidate was right (feedback: preferred, matching the reference, rated well) or, without feedback, what "
        "the ensemble chose. A PairRM checkpoint's encoder embeds the sources; a kNN and a logistic head are fitted "
        "and measured on held-out sources (top-1: the router's first member was right), and the better is kept.",
    )
    rsrc = ro.add_mutually_exclusive_group(required=True)
    rsrc.add_argument("--from-store", metavar="URL", help="the store's URL (sqlite:///... or postgresql://...)")
    rsrc.add_argument("--data", type=Path, help="records.jsonl, as `export` or `eval --records-out` write it")
    ro.add_argument("--encoder", type=Path, required=True, help="the PairRM-hf checkpoint whose encoder embeds")
    ro.add_argument("--out", type=Path, required=True, help="where the router checkpoint goes")
    ro.add_argument("--ensemble", help="with --from-store: only this ensemble's answers")
    ro.add_argument("--kind", choices=["auto", "knn", "linear"], default="auto", help="default: the better held out")
    ro.add_argument("--k", type=int, default=16, help="kNN: neighbours averaged")
    ro.add_argument("--heldout", type=float, default=0.2, help="share of sources kept aside to measure (default 0.2)")
    ro.add_argument(
        "--feedback-only", action="store_true", help="only answers with feedback (not the ensemble's choice)"
    )
    ro.add_argument("--chrf-threshold", type=float, default=80.0, help="chrF at which free text matches a reference")
    ro.add_argument("--seed", type=int, default=0)
    ro.add_argument("--threads", type=int, help="torch threads")
    ro.set_defaults(func=cmd_train_router)

    ex = sub.add_parser(
        "export",
        help="write the store's answers with feedback, and the pairs they give, as JSONL",
        description="records.jsonl: each answer with feedback (its evidence and its feedback); pairs.jsonl: "
        "{source, chosen, rejected} as train-ranker --data reads them.",
    )
    _store(ex, True)
    ex.add_argument("--out", type=Path, required=True, help="the folder the two files go to")
    ex.set_defaults(func=cmd_export)

    rt = sub.add_parser(
        "retrain-ranker",
        help="the learning loop: train from the store, compare, put a better ranker in service, reload",
        description="Pairs from the store's feedback; the configured ranker fine-tuned on them; the held-out "
        "pairwise accuracy of both compared; only when the new one is better is the config file pointed at it "
        "and the gateway reloaded (POST /admin/reload). A failed reload puts the file back. For a cron job.",
    )
    _store(rt, True)
    rt.add_argument("--config", type=Path, required=True, help="the gateway's configuration file")
    rt.add_argument("--ranker", required=True, help="the ranker (by name in the config) to retrain")
    rt.add_argument("--out", type=Path, required=True, help="where new checkpoints go, one folder each")
    rt.add_argument("--gateway", help="the gateway's base URL, to reload it (none: only the file changes)")
    rt.add_argument("--admin-key-env", default="GATEWAY_ADMIN_KEY", help="env var with the admin key")
    rt.add_argument("--min-pairs", type=int, default=20, help="fewer pairs than this: do nothing")
    rt.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="held-out pairwise accuracy (0..1) the new ranker must gain beyond the old one's (default 0: any gain)",
    )
    rt.add_argument("--heldout", type=float, default=0.2, help="share of sources kept aside (default 0.2)")
    _training(rt, 300)
    rt.set_defaults(func=cmd_retrain)
