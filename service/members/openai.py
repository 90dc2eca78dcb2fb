"""Members on an OpenAI-compatible server (vLLM, or any other), reached over the shared httpx
client: kind ``model``, and kind ``lora`` (a LoRA adapter on a vLLM server with LoRA enabled)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx

from service.config import LoRAMemberConfig, MemberConfig
from service.errors import MemberFailure
from service.members.base import Completion, MemberRequest, render_prompt
from service.members.gate import ClassGate
from service.members.http import send
from service.telemetry.tracing import inject, propagating

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
ADAPTER_TIMEOUT_S = 60.0


class OpenAIMember:
    """A member on an OpenAI-compatible server (vLLM, or any other): kind ``model``."""

    gate_class = "tokens"

    def __init__(
        self,
        config: MemberConfig,
        base_url: str,
        client: httpx.AsyncClient,
        gate: ClassGate | None = None,
    ):
        self.name = config.name
        self.config = config
        self.base_url = base_url.rstrip("/")
        self._client = client
        self.gate = gate
        self._headers: dict[str, str] = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if key:
                self._headers["Authorization"] = f"Bearer {key}"
        self._plain_headers = httpx.Headers(self._headers)
        self._json_headers = httpx.Headers({**self._headers, "Content-Type": "application/json"})
        self._urls: dict[str, httpx.URL] = {}
        self._timeouts: dict[float, dict[str, Any]] = {}

    @property
    def headers(self) -> dict[str, str]:
        """What every call to this member's server carries (its API key, if any)."""
        return self._headers

    async def prepare(self) -> None:
        """Make the member servable (e.g. load its adapter); raise ``MemberFailure`` if it cannot be."""

    async def release(self) -> None:
        """Undo ``prepare`` when the member leaves the configuration."""

    def _sampling(self, request: MemberRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.served_name,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.extensions and self.config.extensions == "pass":
            body.update(request.extensions)
        return body

    def _messages(self, request: MemberRequest) -> list[dict[str, str]]:
        if self.config.system_prompt:
            return [{"role": "system", "content": self.config.system_prompt}, *request.messages]
        return request.messages

    async def _payload(self, request: MemberRequest) -> tuple[str, dict[str, Any]]:
        body = self._sampling(request)
        if self.config.api == "chat":
            body["messages"] = self._messages(request)
            return f"{self.base_url}/chat/completions", body
        body["prompt"] = render_prompt(self._messages(request))
        return f"{self.base_url}/completions", body

    def _request(self, method: str, url: str, body: Any, timeout: float) -> httpx.Request:
        """The ``httpx.Request`` for one call, from what is the same for every call made once:
        the URL parsed, the headers, the timeouts."""
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = httpx.URL(url)
        extensions = self._timeouts.get(timeout)
        if extensions is None:
            extensions = self._timeouts[timeout] = {"timeout": httpx.Timeout(timeout).as_dict()}
        headers = self._plain_headers if body is None else self._json_headers
        if propagating():  # the member call's span continues in the server (vLLM reads traceparent)
            headers = headers.copy()
            inject(headers)
        if body is None:
            return httpx.Request(method, target, headers=headers, extensions=extensions)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        return httpx.Request(method, target, content=content, headers=headers, extensions=extensions)

    async def _send(self, method: str, url: str, body: Any, timeout: float, bounded: bool = True) -> httpx.Response:
        """One HTTP call; transport failures become ``MemberFailure``. httpx's timeout bounds each
        read; asyncio's bounds the whole call (slow drips), here unless the caller already does."""
        try:
            if not bounded:
                return await send(self._client, self._request(method, url, body, timeout))
            async with asyncio.timeout(timeout):
                return await send(self._client, self._request(method, url, body, timeout))
        except (httpx.TimeoutException, TimeoutError) as e:
            raise MemberFailure("timeout", f"no answer within {timeout:g}s", e) from e
        except httpx.HTTPError as e:
            raise MemberFailure("connect", f"{type(e).__name__}: {e}", e) from e

    async def generate(self, request: MemberRequest) -> Completion:
        start = time.perf_counter()
        timeout = self.config.timeout_s
        try:
            async with asyncio.timeout(timeout):
                url, body = await self._payload(request)
                if self.gate is None:
                    resp = await self._send("POST", url, body, timeout, bounded=False)
                else:
                    async with self.gate.hold(self.gate_class):
                        resp = await self._send("POST", url, body, timeout, bounded=False)
        except TimeoutError as e:
            raise MemberFailure("timeout", f"no answer within {timeout:g}s", e) from e
        latency_ms = (time.perf_counter() - start) * 1000
        _raise_for_status(resp, self.name)
        return self._parse(resp, latency_ms)

    async def _models(self) -> list[str]:
        resp = await self._send("GET", f"{self.base_url}/models", None, HEALTH_TIMEOUT_S)
        _raise_for_status(resp, self.name)
        try:
            return [str(m["id"]) for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError) as e:
            raise MemberFailure("invalid_response", f"/models: {type(e).__name__}: {e}", e) from e

    async def health(self) -> None:
        await self._models()

    def _choice_text(self, choice: dict[str, Any]) -> Any:
        return choice["message"]["content"] if self.config.api == "chat" else choice["text"]

    def _parse(self, resp: httpx.Response, latency_ms: float) -> Completion:
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = self._choice_text(choice)
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


def _raise_for_status(resp: httpx.Response, member: str, kind: str | None = None) -> None:
    """A ``MemberFailure`` for an error status. What the server said goes to the log, not into the
    failure: clients see a member's failures, and an upstream's body is not theirs to read."""
    if resp.status_code >= 400:
        kind = kind or ("http_5xx" if resp.status_code >= 500 else "http_4xx")
        logger.warning(
            "member %s: %s %s answered HTTP %d: %s",
            member,
            resp.request.method,
            resp.request.url.path,
            resp.status_code,
            resp.text[:500],
        )
        raise MemberFailure(kind, f"HTTP {resp.status_code} from {resp.request.url.path}", upstream=resp.text[:300])


class LoRAMember(OpenAIMember):
    """A LoRA adapter on a vLLM server with LoRA enabled; requests name the adapter as the model.

    With ``load: runtime`` the gateway loads the adapter through ``/v1/load_lora_adapter`` in
    ``prepare`` and unloads it in ``release``; with ``load: startup`` the server loaded it itself.
    """

    def __init__(
        self, config: LoRAMemberConfig, base_url: str, client: httpx.AsyncClient, gate: ClassGate | None = None
    ):
        super().__init__(config, base_url, client, gate)
        self.lora = config

    async def prepare(self) -> None:
        if self.lora.load != "runtime":
            return
        assert self.config.adapter is not None
        body = {"lora_name": self.config.served_name, "lora_path": str(Path(self.config.adapter).resolve())}
        resp = await self._send("POST", f"{self.base_url}/load_lora_adapter", body, ADAPTER_TIMEOUT_S)
        if resp.status_code == 400 and "already" in resp.text.lower():
            return  # loaded by an earlier run of the gateway: same name, same path
        if resp.status_code == 404:
            raise MemberFailure(
                "adapter_load",
                "the server has no /v1/load_lora_adapter (start it with --enable-lora and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
            )
        _raise_for_status(resp, self.name, "adapter_load")

    async def release(self) -> None:
        # vLLM 0.32 only forgets the name here; the engine keeps the adapter (vllm#54839), and
        # after unload/reload cycles we saw base requests answered with an adapter's output.
        if self.lora.load != "runtime":
            return
        body = {"lora_name": self.config.served_name}
        resp = await self._send("POST", f"{self.base_url}/unload_lora_adapter", body, ADAPTER_TIMEOUT_S)
        _raise_for_status(resp, self.name, "adapter_unload")

    async def health(self) -> None:
        if self.config.served_name not in await self._models():
            raise MemberFailure("adapter_missing", f"adapter {self.config.served_name!r} is not loaded")
