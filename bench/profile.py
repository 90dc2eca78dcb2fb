"""``python -m bench.profile``: where the time goes, for the figures that miss their goals.

Writes text reports under ``bench/results/profiles/``:

- ``ranker_real.txt``, ``ranker_tiny_c8.txt``: torch's profiler, operators by self time, for one
  real-shape request and for 8 tiny requests scored together;
- ``fuser_tiny.txt``: cProfile of one GenFuser fusion (where the decode loop spends its steps);
- ``gateway.txt``: py-spy on the gateway process under load (32 clients, stub members), the
  serving thread's frames by inclusive share.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import io
import logging
import pstats
import subprocess
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from bench.common import CACHE, ROOT, rank_requests

logger = logging.getLogger("bench.profile")
OUT = ROOT / "bench" / "results" / "profiles"


def _torch_table(fn: Any, rows: int = 25) -> str:
    from torch.profiler import profile

    fn()  # warm-up
    with profile() as prof:
        fn()
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def ranker(checkpoint: Path, requests: int, source_words: tuple[int, int], cand_words: tuple[int, int]) -> str:
    from service.config import RankerConfig
    from service.models.rankers.pairrm import PairRMRanker, _Job

    ours = PairRMRanker("profile", RankerConfig(checkpoint=str(checkpoint)))
    try:
        items = []
        for r in rank_requests(requests, seed=11, source_words=source_words, cand_words=cand_words):
            job = _Job(r.source, r.candidates, "full", Future())
            job.texts = ours._encode(r.source, r.candidates)
            items += [(job, (i, j)) for i in range(5) for j in range(5) if i != j]
        return _torch_table(lambda: ours._score(items))
    finally:
        ours.close()


def fuser(checkpoint: Path) -> str:
    from bench.fuser import fuse_prompts
    from service.config import FuserConfig
    from service.models.fusers.genfuser import GenFuser

    f = GenFuser("profile", FuserConfig(checkpoint=str(checkpoint)))
    try:
        p = fuse_prompts(1, seed=5, cand_words=(40, 120))[0]
        f.fuse_sync(p.instruction, p.input_text, p.candidates)
        prof = cProfile.Profile()
        prof.runcall(f.fuse_sync, p.instruction, p.input_text, p.candidates)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        return buf.getvalue()
    finally:
        f.close()


def collapse(raw: str, top: int = 45) -> str:
    """py-spy's raw (collapsed) stacks → the serving thread's frames by inclusive share."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or stack.startswith(("Thread._bootstrap", "_bootstrap (threading")):
            continue  # worker threads waiting on their queues
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split("/")[-1].split(":")[0] for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    lines = [f"samples: {total}", "", "inclusive %  frame"]
    lines += [f"{100 * n / total:10.1f}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self %  frame"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in own.most_common(20)]
    return "\n".join(lines)


def gateway(variant: str, seconds: float = 8.0) -> str:
    import psutil

    from bench import gateway as gw
    from bench.loadgen import closed_loop
    from tests.load import stub_server

    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(stub_server(delay_ms=gw.LATENCY_MS)) for _ in range(gw.MEMBERS)]
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-profile-")))
        url = stack.enter_context(gw.serve(gw.gateway_config(urls, variant), tmp, variant))
        port = int(url.rsplit(":", 1)[1])
        pid = next(
            p.pid
            for p in psutil.Process().children(recursive=True)
            if any(c.laddr.port == port for c in p.net_connections(kind="tcp"))
        )
        out = tmp / "spy.txt"

        async def load() -> float:
            call, conns = await gw._gateway_caller(url, gw.WORKERS)
            try:
                await closed_loop(call, gw.WORKERS, 2.0)
                spy_exe = str(Path(sys.executable).parent / "py-spy")  # the venv's; PATH may lack it
                command = [spy_exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw"]
                spy = subprocess.Popen(
                    [*command, "--nonblocking", "-o", str(out)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                result = await closed_loop(call, gw.WORKERS, seconds + 1)
                spy.wait()
                return result.rps
            finally:
                for c in conns:
                    c.close()

        rps = asyncio.run(load())
        return f"gateway ({variant} member client), {rps:.0f} req/s while sampled\n\n" + collapse(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="ranker,fuser,gateway")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bench.__main__ import tiny_models
    from bench.models import make_pairrm_shaped

    OUT.mkdir(parents=True, exist_ok=True)
    tiny = tiny_models()
    parts = args.parts.split(",")
    if "ranker" in parts:
        real = make_pairrm_shaped(CACHE / "pairrm-base", tiny / "pairrm", "base")
        (OUT / "ranker_real.txt").write_text(ranker(real, 1, (10, 20), (25, 50)))
        (OUT / "ranker_tiny_c8.txt").write_text(ranker(tiny / "pairrm", 8, (10, 30), (10, 60)))
    if "fuser" in parts:
        (OUT / "fuser_tiny.txt").write_text(fuser(tiny / "genfuser"))
    if "gateway" in parts:
        (OUT / "gateway.txt").write_text(gateway("shipped") + "\n\n" + gateway("httpx"))
    logger.info("profiles in %s", OUT)


if __name__ == "__main__":
    main()
