"""``ensemble-gateway eval``: a dataset through an ensemble, every member's answer, the ranker's first
choice and the fused answer from one pass (``return_candidates``, fusion forced on so that adaptive
fusion can be replayed at any margin).

The target is a running gateway's URL, or a config served in process (its servers launched as
``serve`` would). Requests run ``concurrency`` at a time; a request that fails is counted, not fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.models.rankers.ranking import fusion_lead
from service.quality.dataset import EvalItem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    member: str
    text: str
    score: float | None
    rank: int


@dataclass
class Observation:
    """What the ensemble did with one item (``error`` set when the request failed)."""

    item: EvalItem
    output: str = ""
    fused: bool = False
    candidates: list[Candidate] = field(default_factory=list)  # best first
    failed: list[str] = field(default_factory=list)
    latency_ms: float = 0.0
    error: str | None = None
    not_called: list[tuple[str, str]] = field(default_factory=list)  # members routing left out, and why

    @property
    def calls(self) -> int:
        """Member calls the answer cost (each member asked, answered or failed)."""
        return len(self.candidates) + len(self.failed)

    def record(self, instruction: str = "") -> dict[str, Any]:
        """The observation as the store's export writes an answer with feedback (the reference as
        its feedback): what ``train-router --data`` and ``train-ranker`` read."""
        return {
            "input": {"instruction": instruction, "input_text": self.item.source},
            "inputs_hashed": False,
            "output": self.output,
            "fused": self.fused,
            "fusion": {"selected": [self.candidates[0].member] if self.candidates else []},
            "candidates": [
                {"member": c.member, "text": c.text, "score": c.score, "rank": c.rank} for c in self.candidates
            ],
            "not_called": [{"member": m, "reason": why} for m, why in self.not_called] or None,
            "feedback": [{"preferred": None, "rejected": [], "reference": self.item.reference, "rating": None}],
        }

    def answer_of(self, member: str) -> str | None:
        return next((c.text for c in self.candidates if c.member == member), None)

    @property
    def first(self) -> str | None:
        return self.candidates[0].text if self.candidates else None

    @property
    def margin(self) -> float | None:
        """The lead adaptive fusion compares with its margin (``fusion_lead``: over the best candidate
        that says something else; inf when all agree, None without scores or candidates)."""
        if not self.candidates:
            return None
        return fusion_lead([c.score for c in self.candidates], [c.text for c in self.candidates])


@dataclass(frozen=True)
class Settings:
    ensemble: str | None = None
    concurrency: int = 4
    temperature: float | None = 0.0
    max_tokens: int | None = None
    timeout_s: float = 300.0
    api_key: str | None = None
    fusion: str | None = "always"  # forced on, so that every method is scored from one pass; None: the policy's


def _body(item: EvalItem, s: Settings) -> dict[str, Any]:
    body: dict[str, Any] = {**item.request(), "return_candidates": True}
    if s.fusion is not None:
        body["fusion"] = s.fusion
    for key, value in (("ensemble", s.ensemble), ("temperature", s.temperature), ("max_tokens", s.max_tokens)):
        if value is not None:
            body[key] = value
    return body


def _observe(item: EvalItem, data: dict[str, Any]) -> Observation:
    cands = [
        Candidate(str(c["member"]), str(c["text"]), c.get("score"), int(c.get("rank", i + 1)))
        for i, c in enumerate(data.get("candidates") or [])
    ]
    return Observation(
        item,
        output=str(data.get("output", "")),
        fused=bool(data.get("fused")),
        candidates=cands,
        failed=[str(f["member"]) for f in data.get("failed_members") or []],
        latency_ms=float((data.get("timings_ms") or {}).get("total", 0.0)),
        not_called=[(str(n["member"]), str(n["reason"])) for n in data.get("not_called") or []],
    )


async def run(
    client: httpx.AsyncClient,
    items: list[EvalItem],
    settings: Settings,
    out: list[Observation],
    on_done: Callable[[Observation], None] = lambda _: None,
) -> None:
    """Send every item; each observation is appended to ``out`` as it arrives (so an interrupted run
    keeps what it has)."""
    gate = asyncio.Semaphore(settings.concurrency)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}

    async def one(item: EvalItem) -> None:
        async with gate:
            try:
                resp = await client.post("/generate", json=_body(item, settings), headers=headers)
                if resp.status_code != 200:
                    error = resp.json().get("error", {}).get("message", resp.text[:200])
                    obs = Observation(item, error=f"HTTP {resp.status_code}: {error}")
                else:
                    obs = _observe(item, resp.json())
            except (httpx.HTTPError, ValueError) as e:
                obs = Observation(item, error=f"{type(e).__name__}: {e}")
        out.append(obs)
        on_done(obs)

    await asyncio.gather(*(one(i) for i in items))


@contextlib.asynccontextmanager
async def gateway_client(
    url: str | None, config_path: Path | None, timeout_s: float
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for a running gateway, or for one served in process from ``config_path``."""
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    if url is not None:
        async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout) as client:
            yield client
        return
    assert config_path is not None
    from service.config import load_config
    from service.members.checks import startup_server_args
    from service.models.build.materialize import materialize
    from service.ops.launcher import Launcher
    from service.serving.app import create_app

    config = await asyncio.to_thread(materialize, load_config(config_path))  # merges and soups built
    with tempfile.TemporaryDirectory(prefix="ensemble-eval-") as logs:
        launcher = Launcher(Path(logs))
        try:
            if config.servers:
                await asyncio.to_thread(launcher.start, config.servers, startup_server_args(config))
            app = create_app(config, launcher=launcher, config_path=config_path, members_checked=True)
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://eval", timeout=timeout) as c,
            ):
                yield c
        finally:
            await asyncio.to_thread(launcher.stop)
