"""Member clients: one model behind an OpenAI-compatible API, reached over a shared httpx client."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from service.config import MemberConfig
from service.errors import UpstreamError, UpstreamTimeout

HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class MemberRequest:
    """What one member is asked: a conversation plus sampling settings."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


@dataclass
class MemberFailure(Exception):
    """Raised by a member; ``kind`` labels the metric (timeout, connect, http_5xx, ...)."""

    kind: str
    detail: str
    cause: BaseException | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"

    def as_gateway_error(self) -> UpstreamError:
        cls = UpstreamTimeout if self.kind == "timeout" else UpstreamError
        return cls(str(self))


class Member(Protocol):
    """One ensemble member.

    ``generate`` returns a ``Completion`` or raises ``MemberFailure``; it never raises anything
    else and never blocks the event loop. It honours its own timeout. ``health`` returns when the
    member can take requests and raises ``MemberFailure`` when it cannot.
    """

    name: str

    async def generate(self, request: MemberRequest) -> Completion: ...

    async def health(self) -> None: ...


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Text for completion-API members: a lone user message as is, else ``role: content`` lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


class OpenAIMember:
    """A member on an OpenAI-compatible server (vLLM, or any other)."""

    def __init__(self, config: MemberConfig, base_url: str, client: httpx.AsyncClient):
        self.name = config.name
        self.config = config
        self.base_url = base_url.rstrip("/")
        self._client = client
        self._headers: dict[str, str] = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if key:
                self._headers["Authorization"] = f"Bearer {key}"

    def _payload(self, request: MemberRequest) -> tuple[str, dict[str, Any]]:
        messages = request.messages
        if self.config.system_prompt:
            messages = [{"role": "system", "content": self.config.system_prompt}, *messages]
        body: dict[str, Any] = {
            "model": self.config.served_name,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if self.config.api == "chat":
            body["messages"] = messages
            return f"{self.base_url}/chat/completions", body
        body["prompt"] = render_prompt(messages)
        return f"{self.base_url}/completions", body

    async def generate(self, request: MemberRequest) -> Completion:
        url, body = self._payload(request)
        start = time.perf_counter()
        timeout = self.config.timeout_s
        try:
            # httpx's timeout bounds each read; asyncio's bounds the whole call (slow drips).
            async with asyncio.timeout(timeout):
                resp = await self._client.post(url, json=body, headers=self._headers, timeout=timeout)
        except (httpx.TimeoutException, TimeoutError) as e:
            raise MemberFailure("timeout", f"no answer within {self.config.timeout_s:g}s", e) from e
        except httpx.HTTPError as e:
            raise MemberFailure("connect", f"{type(e).__name__}: {e}", e) from e
        latency_ms = (time.perf_counter() - start) * 1000
        if resp.status_code >= 400:
            kind = "http_5xx" if resp.status_code >= 500 else "http_4xx"
            raise MemberFailure(kind, f"HTTP {resp.status_code}: {resp.text[:200]}")
        return self._parse(resp, latency_ms)

    async def health(self) -> None:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                resp = await self._client.get(
                    f"{self.base_url}/models", headers=self._headers, timeout=HEALTH_TIMEOUT_S
                )
        except (httpx.TimeoutException, TimeoutError) as e:
            raise MemberFailure("timeout", "health check timed out", e) from e
        except httpx.HTTPError as e:
            raise MemberFailure("connect", f"{type(e).__name__}: {e}", e) from e
        if resp.status_code != 200:
            raise MemberFailure(
                "http_5xx" if resp.status_code >= 500 else "http_4xx", f"HTTP {resp.status_code}"
            )

    def _parse(self, resp: httpx.Response, latency_ms: float) -> Completion:
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.config.api == "chat" else choice["text"]
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}")
            usage = data.get("usage") or {}
            return Completion(
                text=text,
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                latency_ms=latency_ms,
            )
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise MemberFailure("invalid_response", f"{type(e).__name__}: {e}", e) from e


def make_http_client(max_connections: int) -> httpx.AsyncClient:
    """The one client all members share; per-call timeouts come from each member."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(60.0, connect=5.0),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        ),
    )
