"""The LLM fuser (kind ``llm``): Mixture-of-Agents-style aggregation by any OpenAI-compatible
model. It asks the model's chat completions API itself, over the gateway's shared HTTP client: a
fuser, not a member (no retries, breakers or quorum; a failure is the fuser's ``ModelError``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from service.config import LLMFuserConfig
from service.errors import ModelError
from service.members.gate import ClassGate

logger = logging.getLogger(__name__)


def format_candidates(candidates: list[str]) -> str:
    return "\n\n".join(f"[{i}] {c.strip()}" for i, c in enumerate(candidates, start=1))


def aggregation_messages(
    template: str, instruction: str, input_text: str, candidates: list[str]
) -> list[dict[str, str]]:
    """The LLM fuser's conversation: the filled template as system message, the request as user."""
    fields = {
        "instruction": instruction,
        "instruction_block": f"Instruction: {instruction.strip()}\n\n" if instruction.strip() else "",
        "input": input_text,
        "candidates": format_candidates(candidates),
    }
    user = f"{instruction}\n\n{input_text}" if instruction else input_text
    return [{"role": "system", "content": template.format_map(fields)}, {"role": "user", "content": user}]


class LLMFuser:
    """``gate``: where soft-prompt members share the model's server, the fuser's token requests
    take their turn as every member's do (``service.members.gate``)."""

    def __init__(
        self,
        name: str,
        config: LLMFuserConfig,
        base_url: str,
        client: httpx.AsyncClient,
        gate: ClassGate | None = None,
    ):
        self.name = name
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.gate = gate
        self._client = client
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        # vLLM serves /tokenize beside /v1; other servers may not (then the count is None).
        self._tokenize_url = self.base_url.removesuffix("/v1") + "/tokenize"

    def close(self) -> None:
        pass

    async def count_tokens(self, text: str) -> int | None:
        body = {"model": self.config.model, "prompt": text, "add_special_tokens": False}
        try:
            r = await self._client.post(
                self._tokenize_url, json=body, headers=self.headers, timeout=self.config.timeout_s
            )
            count = r.json().get("count") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return count if isinstance(count, int) else None

    def _body(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None, stream: bool
    ) -> dict[str, Any]:
        s = self.config.sampling
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": aggregation_messages(self.config.template, instruction, input_text, candidates),
            "max_tokens": min(s.max_tokens, max_new_tokens) if max_new_tokens else s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if stream:
            body["stream"] = True
        return body

    def _turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.gate.hold("tokens") if self.gate is not None else contextlib.nullcontext()

    def _failed(self, what: str) -> ModelError:
        return ModelError(f"llm fuser {self.name}: {what}")

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """A transport failure of a call to the model as the fuser's ``ModelError``."""
        try:
            yield
        except (TimeoutError, httpx.TimeoutException) as e:
            raise self._failed(f"timeout: no answer within {self.config.timeout_s:g}s") from e
        except httpx.HTTPError as e:
            raise self._failed(f"connect: {type(e).__name__}: {e}") from e

    def _refused(self, r: httpx.Response) -> ModelError:
        """What the server said goes to the log (for operators), not to the client."""
        logger.warning("llm fuser %s: /chat/completions answered HTTP %d: %s", self.name, r.status_code, r.text[:500])
        return self._failed(f"HTTP {r.status_code} from /chat/completions")

    async def fuse(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> str:
        body = self._body(instruction, input_text, candidates, max_new_tokens, stream=False)
        timeout = self.config.timeout_s
        with self._reaching():
            async with asyncio.timeout(timeout), self._turn():
                r = await self._client.post(
                    f"{self.base_url}/chat/completions", json=body, headers=self.headers, timeout=timeout
                )
        if r.status_code >= 400:
            raise self._refused(r)
        try:
            text = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise self._failed(f"invalid_response: {type(e).__name__}: {e}") from e
        if not isinstance(text, str):
            raise self._failed(f"invalid_response: content is {type(text).__name__}")
        return text

    async def fuse_stream(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> AsyncIterator[str]:
        body = self._body(instruction, input_text, candidates, max_new_tokens, stream=True)
        timeout = self.config.timeout_s
        url = f"{self.base_url}/chat/completions"
        with self._reaching():
            async with (
                asyncio.timeout(timeout),
                self._turn(),
                self._client.stream("POST", url, json=body, headers=self.headers, timeout=timeout) as r,
            ):
                if r.status_code >= 400:
                    await r.aread()
                    raise self._refused(r)
                async for line in r.aiter_lines():
                    piece = self._piece(line)
                    if piece:
                        yield piece

    def _piece(self, line: str) -> str | None:
        """The text of one server-sent event of OpenAI's chat stream (None: no text in it)."""
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        try:
            piece = json.loads(data)["choices"][0]["delta"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise self._failed(f"invalid_response: bad stream event: {type(e).__name__}: {e}") from e
        return piece if isinstance(piece, str) else None
