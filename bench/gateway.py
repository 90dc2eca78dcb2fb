"""Part 4: the gateway's own overhead.

Four stub members answer after a fixed 20 ms (``tests/stub_server.py``, raw asyncio). The gateway
(``ensemble-gateway serve``, one worker) serves an ensemble of the four with no ranker and no
fuser: the top candidate is the member order's first. The floor is a bare asyncio script doing
the same fan-out with the gateway's own HTTP client, sending as members do
(``service.members.http``: httpx requests straight to its aiohttp transport); the same fan-out on
httpx's own pool and on bare aiohttp is measured beside it, and so is the gateway with
``member_http: httpx``. Both sides run on uvloop, as uvicorn does.

- latency at concurrency 1: the gateway (one client hop + its fan-out) against the floor's fan-out;
- requests/s with ``WORKERS`` closed-loop callers, the load generator being as lean as it can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, median, percentile
from bench.loadgen import Connection, LoadResult, closed_loop, post_request, sequential

logger = logging.getLogger(__name__)

MEMBERS = 4
LATENCY_MS = 20.0
WORKERS = 32
PIDS: dict[str, int] = {}  # a served gateway's process, by its URL
BODY = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}


@dataclass(frozen=True)
class Workload:
    c1_requests: int  # per block
    blocks: int
    load_seconds: float
    clients: tuple[str, ...] = ("httpx_aiohttp", "httpx", "aiohttp")
    gateways: tuple[str, ...] = ("shipped", "httpx", "store", "traced", "traced_sampled", "limited")


# ``limited``'s client key, and the limits it runs under: never reached, so every request pays the
# check (a Lua script in Redis before it, a release and a charge after it) and none is refused.
BENCH_KEY = "bench-key"
LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000, "concurrent": 10_000}
# The features whose cost is measured beside the shipped path, in the same run (variant: what it adds).
COSTED = ("store", "traced", "traced_sampled", "limited")
SAMPLED_RATIO = "0.1"  # ``traced_sampled``: one trace in ten recorded (the others still pass on traceparent)


def gateway_config(
    stub_urls: list[str], variant: str = "shipped", tmp: Path | None = None, redis_url: str | None = None
) -> dict[str, Any]:
    """``shipped``: the default config; ``httpx``: the same on httpx's own connection pool;
    ``store``: the same recording every answer in an SQLite store (in ``tmp``); ``traced``: the same
    exporting every request's spans over OTLP/HTTP (``serve``'s environment; ``traced_sampled``: one
    request in ten, ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``); ``limited``: the same
    with a client key whose per-key limits are counted in Redis (``redis_url``)."""
    members = [
        {"name": f"m{i}", "endpoint": url, "model": "ok", "timeout_s": 5.0, "sampling": {"max_tokens": 16}}
        for i, url in enumerate(stub_urls)
    ]
    cfg: dict[str, Any] = {"members": members, "ensembles": {"bench": {"members": [m["name"] for m in members]}}}
    if variant == "httpx":
        cfg["member_http"] = "httpx"
    if variant == "store":
        cfg["store"] = {"url": f"sqlite:///{(tmp or Path(tempfile.gettempdir())) / 'bench-store.db'}"}
    if variant == "limited":
        cfg["auth"] = {"api_keys_env": None, "keys": {"bench": {"key": BENCH_KEY}}}
        cfg["limits"] = {"store": redis_url, "keys": {"bench": LIMITS}}
    return cfg


@contextlib.asynccontextmanager
async def fan_out(client: str, urls: list[str]) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """The floor: one request = the four member calls at once, their JSON parsed, as the gateway
    does, with the named client."""
    import httpx

    from service.members.http import make_http_client, send

    bodies = [{**BODY, "model": "ok", "temperature": 0.7, "top_p": 1.0} for _ in urls]
    targets = [f"{u}/chat/completions" for u in urls]
    if client in ("httpx", "httpx_aiohttp"):
        # As members send: an httpx.Request (URL parsed once) straight to the client's transport.
        http = make_http_client(256, "httpx" if client == "httpx" else "aiohttp")
        parsed = [httpx.URL(t) for t in targets]
        extensions = {"timeout": httpx.Timeout(5.0).as_dict()}

        async def post(url: httpx.URL, body: dict[str, Any]) -> httpx.Response:
            return await send(http, httpx.Request("POST", url, json=body, extensions=extensions))

        async def one_httpx() -> bool:
            resps = await asyncio.gather(*(post(u, b) for u, b in zip(parsed, bodies, strict=True)))
            return all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] for r in resps)

        try:
            yield one_httpx
        finally:
            await http.aclose()
    elif client == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

        async def call(target: str, body: dict[str, Any]) -> bool:
            async with session.post(target, json=body) as r:
                data = await r.json()
                return r.status == 200 and bool(data["choices"][0]["message"]["content"])

        async def one_aiohttp() -> bool:
            return all(await asyncio.gather(*(call(t, b) for t, b in zip(targets, bodies, strict=True))))

        try:
            yield one_aiohttp
        finally:
            await session.close()
    else:
        raise ValueError(client)


async def _gateway_caller(
    url: str, workers: int, key: str | None = None
) -> tuple[Callable[[int], Awaitable[bool]], list[Connection]]:
    host, port = url.removeprefix("http://").split(":")
    conns = [await Connection.open(host, int(port)) for _ in range(workers)]
    body = json.dumps({"prompt": "What is the capital of France?"}).encode()
    raw = post_request(host, int(port), "/generate", body, {"authorization": f"Bearer {key}"} if key else None)

    async def call(w: int) -> bool:
        status, body = await conns[w].send(raw)
        return status == 200 and b'"output"' in body

    return call, conns


def _cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) of a process, or of this one."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _summary(r: LoadResult) -> dict[str, float]:
    return {
        "p50_ms": percentile(r.latencies, 50) * 1000,
        "p90_ms": percentile(r.latencies, 90) * 1000,
        "rps": r.rps,
        "errors": r.errors,
        "requests": len(r.latencies),
    }


async def measure(gateways: dict[str, str], stub_urls: list[str], w: Workload) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        floors = {c: await stack.enter_async_context(fan_out(c, stub_urls)) for c in w.clients}
        callers: dict[str, Callable[[int], Awaitable[bool]]] = {}
        conns: list[Connection] = []
        pids: dict[str, int] = {}
        for variant, url in gateways.items():
            call, opened = await _gateway_caller(url, WORKERS, BENCH_KEY if variant == "limited" else None)
            name = "gateway" if variant == "shipped" else f"gateway_{variant}"
            callers[name] = call
            if url in PIDS:
                pids[name] = PIDS[url]
            conns += opened
        try:
            for name, one in floors.items():
                callers[f"floor_{name}"] = lambda _w, one=one: one()  # type: ignore[misc]
            for call in callers.values():  # warm-up: connections open, code paths hot
                await sequential(call, 20)
            c1: dict[str, list[float]] = {n: [] for n in callers}
            errors = dict.fromkeys(callers, 0)
            names = list(callers)
            for b in range(w.blocks):
                for name in names if b % 2 == 0 else reversed(names):
                    r = await sequential(callers[name], w.c1_requests)
                    c1[name] += r.latencies
                    errors[name] += r.errors
            load: dict[str, LoadResult] = {}
            cpu: dict[str, float] = {}
            for name in names:
                before = _cpu_seconds(pids.get(name))
                load[name] = await closed_loop(callers[name], WORKERS, w.load_seconds)
                cpu[name] = (_cpu_seconds(pids.get(name)) - before) / max(len(load[name].latencies), 1) * 1e6
        finally:
            for c in conns:
                c.close()
    p50 = {n: median(v) * 1000 for n, v in c1.items()}
    floor = p50["floor_httpx_aiohttp"]  # the gateway's own client
    return {
        "members": MEMBERS,
        "member_latency_ms": LATENCY_MS,
        "c1_p50_ms": p50,
        "c1_p90_ms": {n: percentile(v, 90) * 1000 for n, v in c1.items()},
        "c1_errors": errors,
        "load_workers": WORKERS,
        "load": {n: _summary(r) for n, r in load.items()},
        # CPU per request under load: the gateway's process, or this process for a floor (its fan-out
        # and the load loop). Steadier than requests/s on a small shared machine.
        "cpu_us_per_request": cpu,
        "overhead_p50_ms": p50["gateway"] - floor,
        "floor_ratio": p50["gateway"] / floor,
        "rps": load["gateway"].rps,
        # What a feature costs beside the path without it, same run: the store (a record queued per
        # answer, batched inserts into SQLite), tracing (a span per stage and member call, exported
        # over OTLP/HTTP in batches), per-key limits in Redis (a script before, two calls after).
        **{
            variant: {
                "c1_p50_ratio": p50[f"gateway_{variant}"] / p50["gateway"],
                "rps_ratio": load[f"gateway_{variant}"].rps / load["gateway"].rps,
                "cpu_ratio": cpu[f"gateway_{variant}"] / cpu["gateway"] if cpu.get("gateway") else None,
            }
            if f"gateway_{variant}" in p50
            else None
            for variant in COSTED
        },
    }


@contextlib.contextmanager
def serve(
    config: dict[str, Any],
    tmp: Path,
    variant: str,
    checkout: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """``ensemble-gateway serve`` in its own process, on ``config``; with ``checkout``, that checkout's
    code (``python -m service.cli`` with it first on ``PYTHONPATH``, this venv's packages);
    ``extra_env``: more variables (the ``traced`` variant's ``OTEL_*``)."""
    import yaml

    from service.ops.launcher import free_port
    from tests.load import stop_process

    cfg = tmp / f"{variant}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    if checkout is None:
        exe = [shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"]
        env = {**os.environ, **extra_env} if extra_env else None
    else:
        exe = [sys.executable, "-m", "service.cli"]
        env = {**os.environ, "PYTHONPATH": str(checkout), **(extra_env or {})}
    log = tmp / f"{variant}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*exe, "serve", "--config", str(cfg), "--port", str(port), "--log-dir", str(tmp / "logs")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=checkout or ROOT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    PIDS[url] = proc.pid
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {variant} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/ready", timeout=2).status == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        PIDS.pop(url, None)
        stop_process(proc)


def run(w: Workload) -> dict[str, Any]:
    from tests.load import stub_server

    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(stub_server(delay_ms=LATENCY_MS)) for _ in range(MEMBERS)]
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gateway-")))
        redis_url = stack.enter_context(_redis()).url if "limited" in w.gateways else None
        env = {v: stack.enter_context(_otlp_sink()) if v.startswith("traced") else {} for v in w.gateways}
        if "traced_sampled" in env:
            env["traced_sampled"].update(
                {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": SAMPLED_RATIO}
            )
        gateways = {
            v: stack.enter_context(serve(gateway_config(urls, v, tmp, redis_url), tmp, v, extra_env=env[v]))
            for v in w.gateways
        }
        logger.info("gateway: %s over %d stubs", gateways, len(urls))
        try:
            import uvloop

            return uvloop.run(measure(gateways, urls, w))
        except ImportError:
            return asyncio.run(measure(gateways, urls, w))


@contextlib.contextmanager
def _redis() -> Iterator[Any]:
    from tests.redis import running_redis

    with running_redis() as r:
        yield r


@contextlib.contextmanager
def _otlp_sink() -> Iterator[dict[str, str]]:
    """A real OTLP/HTTP receiver in its own process (``tests.otlp``), and the variables that send a
    gateway's spans to it over HTTP, as the deploy does (the SDK's default batching: every 5 s or
    512 spans)."""
    from service.ops.launcher import free_port
    from tests.load import stop_process

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.otlp", str(port), "http"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",  # the exporter adds /v1/traces
            "OTEL_SERVICE_NAME": "bench-gateway",
        }
    finally:
        stop_process(proc)
