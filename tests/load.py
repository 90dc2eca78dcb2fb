"""Real processes for fault and load tests: the scripted stub server, a gateway started with
`ensemble-gateway serve`, and a load driver that accounts for every request it sends.

Each request ends in exactly one bucket: ``answered`` (200), ``errors`` (a non-200 with an
OpenAI-shaped JSON error), ``refused`` (the connection was refused: never accepted), ``lost``
(accepted, then no usable answer: a reset, or a body that is not the error shape) or ``hung``
(no answer by its deadline plus one second). With ``RELIABILITY_OUT`` set, tests append a row per
scenario to that JSON-lines file; ``python -m tests.reliability_report`` turns it into a table.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.ops.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]


def full_scale() -> bool:
    """``make reliability`` runs the scenarios at full size; ``make test`` at a smaller one."""
    return os.environ.get("RELIABILITY_FULL") == "1"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not up after {timeout_s:g}s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


@contextmanager
def stub_server(delay_ms: float = 0.0, drip_ms: float = 200.0) -> Iterator[str]:
    """The scripted OpenAI-like server; yields its base URL (``.../v1``)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.stub_server",
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
            "--drip-ms",
            str(drip_ms),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 30)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(proc, signal.SIGKILL)


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    ops_url: str | None = None  # the operators' port (serve --ops-port), where one was asked for


@contextmanager
def gateway_process(
    config: dict[str, Any], tmp: Path, wait_ready: bool = True, ops_port: bool = False
) -> Iterator[GatewayProcess]:
    """`ensemble-gateway serve` on ``config`` (``ops_port``: with an operators' port too); stopped with
    SIGTERM (then SIGKILL) by its pid."""
    cfg = tmp / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    ops = ["--ops-port", str(free_port())] if ops_port else []
    log = tmp / "gateway.log"
    exe = shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "serve", "--config", str(cfg), "--port", str(port), *ops, "--log-dir", str(tmp / "logs")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/ready" if wait_ready else f"{url}/health", proc, 300, log)
        yield GatewayProcess(url, proc, log, f"http://127.0.0.1:{ops[1]}" if ops else None)
    finally:
        stop_process(proc)


def stub_config(stub_url: str, models: list[str], timeout_s: float = 2.0, **ensemble: Any) -> dict[str, Any]:
    """A gateway config whose members are the stub server's ``models`` (names may repeat a model)."""
    members = [
        {"name": f"m{i}-{m}", "endpoint": stub_url, "model": m, "timeout_s": timeout_s, "sampling": {"max_tokens": 16}}
        for i, m in enumerate(models)
    ]
    return {
        "members": members,
        "ensembles": {"main": {"members": [m["name"] for m in members], **ensemble}},
        "logging": {"level": "warning"},
    }


@contextmanager
def tier_process(config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> Iterator[GatewayProcess]:
    """`ensemble-gateway serve-models` on ``config`` (a model tier's), once /ready; stopped by its pid."""
    path = tmp / "tier.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "tier.log"
    exe = shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "serve-models", "--config", str(path), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/ready", proc, 300, log)
        yield GatewayProcess(url, proc, log)
    finally:
        stop_process(proc)


@dataclass
class Result:
    sent: int = 0
    answered: int = 0
    degraded: int = 0
    errors: Counter[int] = field(default_factory=Counter)
    refused: int = 0
    lost: int = 0
    hung: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # answered requests only
    error_latencies_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what lost requests looked like
    responses: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def accounted(self) -> int:
        return self.answered + sum(self.errors.values()) + self.refused + self.lost + self.hung

    def pct(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(self.latencies_ms if values is None else values)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q / 100 * len(data)))]

    def check(self) -> None:
        """The reliability contract: nothing lost, nothing hung, every request accounted for."""
        assert self.accounted == self.sent, f"sent {self.sent}, accounted {self.accounted}"
        assert self.lost == 0, f"{self.lost} lost: {self.problems[:5]}"
        assert self.hung == 0, f"{self.hung} hung"


def _is_openai_error(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err) and bool(err["message"])


async def drive(
    url: str,
    body: Callable[[int], dict[str, Any]],
    n: int,
    concurrency: int,
    deadline_s: float,
    path: str = "/generate",
    keep: bool = False,
    rate: float | None = None,
    stop_on_shutdown: bool = False,
    headers: dict[str, str] | None = None,
    seconds: float | None = None,
    into: Result | None = None,
) -> Result:
    """Send ``n`` requests, ``concurrency`` at a time (or at ``rate`` per second, open loop, over
    at most ``concurrency`` connections); each may take its deadline plus one second. With
    ``seconds`` (closed loop), no request leaves after that long. ``into``: count into that result
    (several gateways driven at once, one tally).

    With ``stop_on_shutdown``, no request is sent after one was answered 503 ``shutting_down``,
    as a load balancer stops routing to a draining replica."""
    stopping = False
    result = into if into is not None else Result()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    indices = itertools.count()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        result.sent += 1
        t0 = time.perf_counter()
        try:
            resp = await client.post(url + path, json=body(i), timeout=deadline_s + 1.0, headers=headers)
        except httpx.ConnectError:
            result.refused += 1
            return
        except httpx.TimeoutException:
            result.hung += 1
            return
        except httpx.HTTPError as e:
            result.lost += 1
            result.problems.append(f"{type(e).__name__}: {e}")
            return
        ms = (time.perf_counter() - t0) * 1000
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code == 200 and isinstance(data, dict) and ("output" in data or "choices" in data):
            result.answered += 1
            result.latencies_ms.append(ms)
            result.degraded += bool(data.get("degraded"))
            if keep:
                result.responses.append(data)
        elif resp.status_code != 200 and _is_openai_error(data):
            nonlocal stopping
            stopping = stopping or (stop_on_shutdown and data["error"]["code"] == "shutting_down")
            result.errors[resp.status_code] += 1
            result.error_latencies_ms.append(ms)
            if keep:
                result.responses.append({"status": resp.status_code, **data})
        else:
            result.lost += 1
            result.problems.append(f"HTTP {resp.status_code}: {resp.text[:200]}")

    t0 = time.perf_counter()
    stop_at = t0 + seconds if seconds is not None else math.inf

    async def worker(client: httpx.AsyncClient) -> None:
        while not stopping and time.perf_counter() < stop_at:
            i = next(indices)
            if i >= n:
                return
            await one(client, i)

    async with httpx.AsyncClient(limits=limits) as client:
        if rate is None:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        else:  # open loop: request i leaves at i / rate, whatever the answers do
            tasks = []
            for i in range(n):
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                tasks.append(asyncio.create_task(one(client, i)))
            await asyncio.gather(*tasks)
    result.wall_s = time.perf_counter() - t0
    return result


def record(name: str, injected: str, load: str, result: Result, command: str, **extra: Any) -> None:
    """Append this scenario's row to ``$RELIABILITY_OUT`` (JSON lines), if set."""
    out = os.environ.get("RELIABILITY_OUT")
    if not out:
        return
    row = {
        "name": name,
        "injected": injected,
        "load": load,
        "sent": result.sent,
        "answered": result.answered,
        "degraded": result.degraded,
        "errors": dict(sorted((str(k), v) for k, v in result.errors.items())),
        "refused": result.refused,
        "lost": result.lost,
        "hung": result.hung,
        "p50_ms": round(result.pct(50), 1),
        "p99_ms": round(result.pct(99), 1),
        "wall_s": round(result.wall_s, 2),
        "command": command,
        **extra,
    }
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
