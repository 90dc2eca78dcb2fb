"""The gateway's own cost, this checkout against another one, side by side in one run.

    git worktree add /tmp/old <commit>
    python -m bench.compare /tmp/old [--requests 200 --load-seconds 8]

Both gateways (``python -m service.cli serve``, each with its checkout first on ``PYTHONPATH``, this
venv's packages) serve the bench ensemble over the same stub members; the requests alternate between
them in blocks, then each takes closed-loop load. Prints c1 p50 and req/s for both and the floors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from bench import gateway
from tests.load import stub_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per block and gateway")
    parser.add_argument("--load-seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    w = gateway.Workload(args.requests, 4, args.load_seconds, clients=("httpx_aiohttp", "aiohttp"), gateways=())
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(stub_server(delay_ms=gateway.LATENCY_MS)) for _ in range(gateway.MEMBERS)]
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-compare-")))
        config = gateway.gateway_config(urls)
        gateways = {
            "shipped": stack.enter_context(gateway.serve(config, tmp, "this")),
            "other": stack.enter_context(gateway.serve(config, tmp, "other", args.other.resolve())),
        }
        import uvloop

        out = uvloop.run(gateway.measure(gateways, urls, w))
    rows = {"this": "gateway", "other": "gateway_other", **{f: f for f in ("floor_httpx_aiohttp", "floor_aiohttp")}}
    report = {
        label: {"c1_p50_ms": round(out["c1_p50_ms"][key], 3), "rps": round(out["load"][key]["rps"], 1)}
        for label, key in rows.items()
    }
    report["rps_ratio_this_over_other"] = {"ratio": round(report["this"]["rps"] / report["other"]["rps"], 3)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
