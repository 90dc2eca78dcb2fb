"""Command line: ``ensemble-gateway serve | serve-models | check-config | merge | make-tiny-models | train |
suite | eval | train-ranker | train-fuser | train-router | export | retrain-ranker``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.config import load_config, package_version
from service.errors import ConfigError
from service.telemetry.logs import setup_logging

logger = logging.getLogger("service.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    from service.serving.server import serve

    return serve(Path(args.config), args.host, args.port, Path(args.log_dir), args.ops_port)


def cmd_serve_models(args: argparse.Namespace) -> int:
    from service.serving.tier import serve_models

    return serve_models(Path(args.config), args.host, args.port)


def cmd_make_tiny_models(args: argparse.Namespace) -> int:
    from service.models.checkpoints.tiny import make_tiny_models

    paths = make_tiny_models(Path(args.dir), force=args.force)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from service.quality.train import train_all

    report = train_all(Path(args.dir), small=args.small, force=args.force, threads=args.threads)
    print(json.dumps(asdict(report), indent=1))
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from service.quality import suite

    skills = tuple(args.skills.split(",")) if args.skills else suite.SKILLS
    try:
        if args.seed >= suite.EVAL_SEED_BASE:
            items = suite.eval_suite(args.seed, args.per_skill, skills)
        else:
            items = suite.training_items(args.seed, args.per_skill, skills)
    except ValueError as e:
        print(f"ensemble-gateway suite: {e}", file=sys.stderr)
        return 2
    suite.write_jsonl(Path(args.out), items)
    print(f"{len(items)} prompts ({', '.join(skills)}; seed {args.seed}): {args.out}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from service.models.build.materialize import materialize

    try:
        config = load_config(args.config)
        materialize(config, build=False)  # recipes checked, nothing built
    except ConfigError as e:
        print(f"ensemble-gateway: {e}", file=sys.stderr)
        return 2
    print(f"ok: {len(config.members)} members, {len(config.ensembles)} ensembles (default {config.default})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from service.models.build.merges import read_recipe, run_merge_recipe

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"ensemble-gateway merge: {out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        run_merge_recipe(read_recipe(args.recipe, args.recipe), out, device=args.device)
    except ConfigError as e:
        print(f"ensemble-gateway merge: {e}", file=sys.stderr)
        return 2
    print(f"merged: {out}")
    return 0


def cmd_adapter_server(args: argparse.Namespace) -> int:
    import os

    from service.ops.launcher import adapters_env, require_adapters_python

    try:
        python = require_adapters_python(args.python)
    except FileNotFoundError as e:
        print(f"adapter-server: {e} (or pass --python)", file=sys.stderr)
        return 2
    os.execve(python, [python, "-m", "service.adapterserver", *args.server_args], adapters_env())


def cmd_eval(args: argparse.Namespace) -> int:
    from service.quality.cli import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ensemble-gateway",
        description="Several LLMs answering as one: fan a request out to member models (vLLM servers, LoRA "
        "adapters, soft prompts), rank the candidates with PairRM, fuse the best with GenFuser. "
        "`serve --config FILE` runs the gateway; the other commands check configurations, make and train "
        "checkpoints, and evaluate ensembles.",
        epilog="Each command has its own --help. Docs: README.md and docs/.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error (default info)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="start the configured servers, then serve the gateway",
        description="Validate the configuration (an error names the field and nothing starts), start the vLLM "
        "servers it lists under `servers` (single-node mode) and wait for each, load the rankers and fusers, then "
        "serve /generate, the OpenAI API (/v1), the status page, /metrics and /docs, and print a summary of what "
        "runs where. SIGHUP reloads the file; SIGTERM or Ctrl-C drains requests and stops the servers.",
    )
    serve.add_argument("--config", required=True, help="YAML configuration file (see README, Configuration)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument(
        "--ops-port",
        type=int,
        default=None,
        help="a second port for operators: /metrics, /status.json and the status page move there (the API's port "
        "answers 404 for them); /health and /ready answer on both. Default: everything on --port",
    )
    serve.add_argument(
        "--log-dir", default=".cache/logs", help="where launched vLLM servers write their logs (default .cache/logs)"
    )
    serve.set_defaults(func=cmd_serve)

    tier = sub.add_parser(
        "serve-models",
        help="serve rankers and fusers over HTTP: the model tier that gateways without GPUs call",
        description="Load the rankers (PairRM) and fusers (GenFuser) a tier configuration lists (`rankers:`, "
        "`fusers:`, as in a gateway's file; `api_keys_env`, `torch_threads`) and serve POST /v1/rank, /v1/fuse "
        "(whole or streamed), /v1/tokenize, /v1/models, /health, /ready and /metrics. Every caller shares the "
        "models' batches. A gateway names them with `rankers.NAME.endpoint` / `fusers.NAME.endpoint`.",
    )
    tier.add_argument("--config", required=True, help="YAML: rankers and fusers (see README, The model tier)")
    tier.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    tier.add_argument("--port", type=int, default=8001, help="port to listen on (default 8001)")
    tier.set_defaults(func=cmd_serve_models)

    tiny = sub.add_parser(
        "make-tiny-models",
        help="write the tiny random-weight checkpoints",
        description="Write the tiny random-weight checkpoints (two Llama bases, LoRA and prompt-tuning adapters, a "
        "PairRM, a GenFuser) that config/tiny.yaml and the tests serve; complete ones are kept.",
    )
    tiny.add_argument("dir", help="output root, e.g. .cache/tiny-models")
    tiny.add_argument("--force", action="store_true", help="rewrite existing checkpoints")
    tiny.set_defaults(func=cmd_make_tiny_models)

    train = sub.add_parser(
        "train",
        help="train the quality ensemble (two bases, LoRAs, a soft prompt, PairRM, GenFuser) from the task suite",
        description="Train every checkpoint of the demo's quality ensemble on this machine's CPU, from the task "
        "suite and fixed seeds. Each step stamps its folder with a hash of its recipe and the suite's version; a "
        "second run trains only what changed.",
    )
    train.add_argument("dir", help="output root, e.g. .cache/tiny-models/trained")
    train.add_argument("--small", action="store_true", help="a few steps of each model (tests)")
    train.add_argument("--force", action="store_true", help="retrain even where the stamps match")
    train.add_argument(
        "--threads",
        type=int,
        default=2,  # service.quality.train.THREADS, not imported here: the CLI loads torch only when it runs
        help="torch threads (default 2, fixed so that a rerun reproduces the checkpoints: float sums, and so "
        "the trained weights, depend on the thread count)",
    )
    train.set_defaults(func=cmd_train)

    st = sub.add_parser(
        "suite",
        help="write task-suite prompts (add, reverse, sort, capital) with references as JSONL",
        description="Write the task suite as JSONL (prompt, reference, tag). Seeds from 1000000 up are evaluation "
        "seeds (never used in training); the demo's held-out suite is seed 1000001.",
    )
    st.add_argument("out", help="the JSONL file to write")
    st.add_argument("--seed", type=int, default=1_000_001, help="suite seed (default 1000001, the held-out suite)")
    st.add_argument("--per-skill", type=int, default=100, help="prompts per skill (default 100)")
    st.add_argument(
        "--skills",
        help="comma-separated skills (default add,reverse,sort,capital; compound: a capital and a sum in one prompt)",
    )
    st.set_defaults(func=cmd_suite)

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file and exit",
        description="Validate a configuration as `serve` would (every field, cross-references, adapter files) "
        "without starting anything; exit 0 with a one-line summary, or 2 with the error naming the field.",
    )
    check.add_argument("config", help="YAML configuration file")
    check.set_defaults(func=cmd_check_config)

    merge = sub.add_parser(
        "merge",
        help="merge models with mergekit from a recipe (linear, task_arithmetic, ties, dare_ties, slerp, ...)",
        description="Run a mergekit recipe (YAML: merge_method, models, base_model, parameters, dtype) and write the "
        "merged model with the tokenizer and generation config of its base (else first) model into OUT, ready for "
        "vLLM. A server may name the same recipe as `merge:` instead of `model:`; `serve` then builds it into its "
        "cache itself.",
    )
    merge.add_argument("recipe", help="mergekit recipe (YAML)")
    merge.add_argument("out", help="output directory (new or empty)")
    merge.add_argument("--device", default="cpu", help="where mergekit computes: cpu (default) or cuda")
    merge.set_defaults(func=cmd_merge)

    ev = sub.add_parser(
        "eval",
        help="send a dataset through an ensemble; score every member, the ranker's choice and the fused answer",
        description="Send a JSONL dataset (prompt or messages, reference, optional tag) through an ensemble with "
        "return_candidates and fusion forced on, and report per tag and overall: each member, a random member, the "
        "best single member, the ranker's first choice, the fused answer, the ensemble's own policy, adaptive "
        "fusion at several margins, and the oracle. Writes report.json, report.md and chart.png.",
    )
    ev.add_argument("dataset", type=Path, help="JSONL: {prompt | messages, reference, tag?} per line")
    target = ev.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running gateway, e.g. http://127.0.0.1:8000")
    target.add_argument("--config", type=Path, help="serve this config in process (its servers started too)")
    ev.add_argument("--ensemble", help="the ensemble to evaluate (default: the gateway's default)")
    ev.add_argument("--concurrency", type=int, default=4, help="requests at once (default 4)")
    ev.add_argument("--temperature", type=float, default=0.0, help="members' temperature (default 0: greedy)")
    ev.add_argument("--max-tokens", type=int, help="members' token limit (default: each member's own)")
    ev.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    ev.add_argument("--api-key", help="a client key, if the gateway requires one (or GATEWAY_API_KEY)")
    ev.add_argument("--margins", default="0.25,0.5,1,2,4", help="adaptive-fusion margins to replay")
    ev.add_argument("--judge", type=Path, help="a PairRM-hf checkpoint: win rate of the answer against each member")
    ev.add_argument("--out", type=Path, default=Path("eval-report"), help="where the report goes (default eval-report)")
    ev.add_argument("--pairs-out", type=Path, help="also write {source, chosen, rejected} pairs for train-ranker")
    ev.add_argument(
        "--records-out",
        type=Path,
        help="also write each answer with its reference as feedback, for train-router --data",
    )
    ev.set_defaults(func=cmd_eval)

    from service.quality.learn_cli import add_commands

    add_commands(sub)  # train-ranker, train-fuser, train-router, export, retrain-ranker

    ad = sub.add_parser(
        "adapter-server",
        help="serve bottleneck and prefix-tuning adapters (the adapters library) over an OpenAI-compatible API",
        description="Run the adapter server (service/adapterserver) on its own, e.g. for a deployment, from the "
        "environment that has the `adapters` library (--python, else $ENSEMBLE_ADAPTERS_PYTHON, else "
        ".venv-adapters/bin/python). Every argument after the command goes to it: --model DIR, --adapter NAME=DIR "
        "(repeated), --served-model-name, --host, --port, --device, --dtype, --max-batch, --threads.",
    )
    ad.add_argument("--python", default=None, help="the interpreter of the adapters environment")
    ad.set_defaults(func=cmd_adapter_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is cmd_adapter_server:  # its own options go to the adapter server
        args.server_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.log_level, json_logs=False)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
