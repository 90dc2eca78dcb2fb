"""Rankers and fusers served by the model tier (``ensemble-gateway serve-models``), reached over
HTTP: ``RemoteRanker`` and ``RemoteFuser`` implement the same interfaces as the in-process models,
so the pipeline does not know the difference, and their answers are the tier's models' own (scores
travel as JSON numbers, which round-trip a float exactly; texts as they are).

A call is retried after a connection error or a 5xx (full-jitter backoff) while its timeout
allows; a circuit breaker per remote model skips it for a cool-down after consecutive failures.
Every failure is a ``ModelError``: the pipeline then degrades as it does for a local model (member
order for a ranker, the top candidate for a fuser) and the answer says why. Each call carries the
current span's ``traceparent``, and the tier's key (``api_key_env``) when it has one.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from service.config import BreakerConfig, RemoteModelConfig, RetryConfig
from service.errors import ModelError
from service.members.breakers import CircuitBreaker
from service.members.fanout import backoff_s
from service.models.rankers.ranking import Ranking
from service.telemetry.tracing import inject


class _Remote:
    """What a remote ranker and fuser share: the URL, the key, retries, the breaker."""

    def __init__(
        self,
        name: str,
        config: RemoteModelConfig,
        client: httpx.AsyncClient,
        retry: RetryConfig,
        breaker: BreakerConfig,
    ):
        self.name = name
        self.config = config
        self.model = config.model or name
        self.base_url = config.endpoint.rstrip("/")
        self._client = client
        self.retry = retry
        self.breaker = CircuitBreaker(f"model tier {name}", breaker)
        self._headers = {"Content-Type": "application/json"}
        if config.api_key_env and os.environ.get(config.api_key_env):
            self._headers["Authorization"] = f"Bearer {os.environ[config.api_key_env]}"

    def _admit(self) -> None:
        """Raise while the breaker skips the tier."""
        if not self.breaker.allow():
            raise self._fail("circuit_open", f"skipped for {self.breaker.retry_in_s:.1f}s after {self.breaker.reason}")

    def _fail(self, kind: str, message: str) -> ModelError:
        return ModelError(f"model tier {self.base_url} ({self.model}): {kind}: {message}", code="model_tier_" + kind)

    def _request(self, path: str, body: dict[str, Any]) -> httpx.Request:
        headers = dict(self._headers)
        inject(headers)
        content = json.dumps({"model": self.model, **body}, ensure_ascii=False).encode()
        timeout = httpx.Timeout(self.config.timeout_s)
        return httpx.Request(
            "POST",
            f"{self.base_url}{path}",
            content=content,
            headers=headers,
            extensions={"timeout": timeout.as_dict()},
        )

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        """The tier's JSON answer to one call, retried after a connection error or a 5xx."""
        self._admit()
        attempt = 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_s
        while True:
            kind, message = "", ""
            try:
                async with asyncio.timeout(max(0.001, deadline - loop.time())):
                    resp = await self._client.send(self._request(path, body))
            except (TimeoutError, httpx.TimeoutException):
                kind, message = "timeout", f"no answer within {self.config.timeout_s:g}s"
            except httpx.HTTPError as e:
                kind, message = "connect", f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 400:
                    try:
                        data = resp.json()
                    except ValueError:
                        kind, message = "invalid_response", "the body is not JSON"
                    else:
                        self.breaker.success()
                        return data
                else:
                    kind = "http_5xx" if resp.status_code >= 500 else "http_4xx"
                    message = f"HTTP {resp.status_code}: {_error_message(resp)}"
            pause = backoff_s(attempt, self.retry)
            if kind in ("connect", "http_5xx") and attempt < self.retry.attempts and loop.time() + pause < deadline:
                attempt += 1
                await asyncio.sleep(pause)
                continue
            if kind != "http_4xx":  # a request the tier refused is not the tier failing
                self.breaker.failure(f"{kind}: {message}")
            raise self._fail(kind, message)

    def close(self) -> None:
        """Nothing to stop: the HTTP client is the gateway's."""


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


class RemoteRanker(_Remote):
    """A ranker on the model tier: ``POST /v1/rank``."""

    async def rank(self, source: str, candidates: list[str]) -> Ranking:
        data = await self._post("/v1/rank", {"source": source, "candidates": candidates})
        try:
            scores, ranks = [float(s) for s in data["scores"]], [int(r) for r in data["ranks"]]
        except (KeyError, TypeError, ValueError) as e:
            raise self._fail("invalid_response", f"{type(e).__name__}: {e}") from e
        if len(scores) != len(candidates) or len(ranks) != len(candidates):
            raise self._fail("invalid_response", f"{len(scores)} scores for {len(candidates)} candidates")
        return Ranking(scores, ranks)


class RemoteFuser(_Remote):
    """A fuser on the model tier: ``POST /v1/fuse`` (whole, or streamed as server-sent events),
    ``POST /v1/tokenize``."""

    def _body(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None
    ) -> dict[str, Any]:
        return {
            "instruction": instruction,
            "input": input_text,
            "candidates": candidates,
            "max_new_tokens": max_new_tokens,
        }

    async def fuse(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> str:
        data = await self._post("/v1/fuse", self._body(instruction, input_text, candidates, max_new_tokens))
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise self._fail("invalid_response", "no text")
        return text

    async def fuse_stream(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> AsyncIterator[str]:
        self._admit()
        body = {**self._body(instruction, input_text, candidates, max_new_tokens), "stream": True}
        request = self._request("/v1/fuse", body)
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.HTTPError as e:
            self.breaker.failure(f"connect: {e}")
            raise self._fail("connect", f"{type(e).__name__}: {e}") from e
        try:
            if resp.status_code >= 400:
                await resp.aread()
                if resp.status_code >= 500:
                    self.breaker.failure(f"HTTP {resp.status_code}")
                raise self._fail("http_5xx" if resp.status_code >= 500 else "http_4xx", _error_message(resp))
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    self.breaker.success()
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise self._fail("stream", str(event["error"].get("message")))
                yield str(event["text"])
            raise self._fail("stream", "the stream ended without [DONE]")
        except httpx.HTTPError as e:
            self.breaker.failure(f"stream: {e}")
            raise self._fail("stream", f"{type(e).__name__}: {e}") from e
        finally:
            await resp.aclose()

    async def count_tokens(self, text: str) -> int | None:
        data = await self._post("/v1/tokenize", {"text": text})
        count = data.get("count") if isinstance(data, dict) else None
        return int(count) if isinstance(count, int) else None
