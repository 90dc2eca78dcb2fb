"""A real vLLM member frozen (SIGSTOP) or killed (SIGKILL) under load, on the demo gateway.

The frozen server accepts connections and never answers: requests must still be answered within
their deadline (the quorum answers, the straggler is cut, active health checks open its circuit).
The killed server must be restarted by the gateway's supervisor, and the ensemble heal.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from tests.integration.conftest import Gateway
from tests.load import Result, drive, full_scale, record

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0
CMD = "pytest tests/integration/test_member_faults.py::{}"


def server_process(gateway: Gateway, name: str) -> psutil.Process:
    """The API-server process of launched server ``name`` (found by its port)."""
    port = str(urlparse(gateway.server_urls[name]).port)
    for p in psutil.Process(gateway.pid).children(recursive=False):
        cmd = p.cmdline()
        if "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            return p
    raise AssertionError(f"no process serves {name} on port {port}")


def wait_member(gateway: Gateway, member: str, up: bool, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    state: dict[str, object] = {}
    while time.monotonic() < deadline:
        state = httpx.get(gateway.url + "/ready", timeout=10).json()["members"][member]
        if state["up"] is up and (state["circuit"] != "open") is up:
            return state
        time.sleep(1)
    raise AssertionError(f"{member} not {'up' if up else 'down'} after {timeout_s:g}s: {state}")


def load_in_background(gateway: Gateway, n: int, conc: int) -> tuple[threading.Thread, dict[str, Result]]:
    box: dict[str, Result] = {}
    body = {"deadline_s": DEADLINE_S, "max_tokens": 8, "return_candidates": True}
    coro = drive(gateway.url, lambda i: {"prompt": f"fault question {i}", **body}, n, conc, DEADLINE_S, keep=True)
    t = threading.Thread(target=lambda: box.update(r=asyncio.run(coro)))
    t.start()
    return t, box


def test_frozen_member_is_cut_and_ejected(gateway: Gateway) -> None:
    n, conc = (40, 4) if full_scale() else (12, 2)
    proc = server_process(gateway, "base-b")
    proc.send_signal(signal.SIGSTOP)
    try:
        t, box = load_in_background(gateway, n, conc)
        t.join(timeout=n * (DEADLINE_S + 2))
        res = box["r"]
        res.check()
        assert res.answered == n
        for r in res.responses:
            assert "llama-b" not in {c["member"] for c in r["candidates"]}
            failed = {f["member"]: f for f in r["failed_members"]}
            assert "llama-b" in failed and r["degraded"]
            assert failed["llama-b"]["kind"] in ("deadline", "straggler", "timeout", "circuit_open")
        assert res.pct(99) < DEADLINE_S * 1000
        state = wait_member(gateway, "llama-b", up=False, timeout_s=30)  # active checks (2 s timeout)
        assert state["circuit"] == "open"
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_member(gateway, "llama-b", up=True, timeout_s=90)
    record(
        "vLLM member frozen",
        "SIGSTOP to the vLLM server of 1 of 5 members (it accepts connections, never answers)",
        f"{n} requests, {conc} concurrent, deadline {DEADLINE_S:g} s",
        res,
        CMD.format("test_frozen_member_is_cut_and_ejected"),
    )


def test_killed_member_server_is_restarted(gateway: Gateway) -> None:
    n, conc = (40, 4) if full_scale() else (12, 2)
    proc = server_process(gateway, "base-b")
    t, box = load_in_background(gateway, n, conc)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    t.join(timeout=n * (DEADLINE_S + 2))
    res = box["r"]
    res.check()
    assert res.answered == n
    assert any("llama-b" in {f["member"] for f in r["failed_members"]} for r in res.responses)
    wait_member(gateway, "llama-b", up=True, timeout_s=300)
    healed_s = time.monotonic() - killed_at
    assert server_process(gateway, "base-b").pid != proc.pid
    body = {"prompt": "after the restart", "max_tokens": 8, "return_candidates": True}
    after = httpx.post(gateway.url + "/generate", json=body, timeout=60).json()
    assert after["failed_members"] == [] and "llama-b" in {c["member"] for c in after["candidates"]}
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_server_restarts_total{server="base-b"} 1.0' in metrics
    record(
        "vLLM member killed",
        "SIGKILL to the vLLM server of 1 of 5 members, 2 s into the run",
        f"{n} requests, {conc} concurrent, deadline {DEADLINE_S:g} s",
        res,
        CMD.format("test_killed_member_server_is_restarted"),
        note=f"server restarted by the gateway; member back in {healed_s:.0f} s",
    )
