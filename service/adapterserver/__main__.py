"""``python -m service.adapterserver --model DIR --adapter NAME=DIR ... --port N``: the adapter server,
run by the interpreter of the environment that has the ``adapters`` library (``make adapters-env``
builds ``.venv-adapters``). ``ensemble-gateway adapter-server`` starts it with that interpreter."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_adapters(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter {item!r}: expected NAME=DIR")
        if name in out:
            raise SystemExit(f"--adapter {name}: given twice")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.adapterserver", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the base model directory")
    parser.add_argument("--served-model-name", default=None, help="the base's name in requests (default: --model)")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR, an adapter saved by save_adapter")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-batch", type=int, default=8, help="greedy requests for one adapter per generate")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the model's worker")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_API_KEY"),
        help="the key /v1 requests must send as Bearer (default: VLLM_API_KEY, as vLLM; unset: open)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)

    import uvicorn

    from service.adapterserver.app import create_app
    from service.adapterserver.engine import AdapterError, Engine

    try:
        engine = Engine(args.model, parse_adapters(args.adapter), args.device, args.dtype, args.max_batch, args.threads)
    except AdapterError as e:
        print(f"adapter server: {e}", file=sys.stderr)
        return 2
    app = create_app(engine, args.served_model_name or args.model, args.max_model_len, args.api_key)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
