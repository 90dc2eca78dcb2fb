"""Fusers turn the top-ranked candidates into one answer: the ``Fuser`` interface, and the LLM
fuser (Mixture-of-Agents-style aggregation by any OpenAI-compatible model). GenFuser is in
``service.models.genfuser``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import httpx

from service.config import LLMFuserConfig, MemberConfig
from service.errors import MemberFailure, ModelError
from service.members.base import MemberRequest
from service.members.gate import ClassGate
from service.members.openai import OpenAIMember


class Fuser(Protocol):
    """Fuses candidates (best first) for an instruction and input into one text.

    ``fuse`` raises ``ModelError`` on failure and runs its model work off the event loop.
    ``max_new_tokens`` (the request's ``max_tokens``) lowers the fuser's own limit, never raises it.
    """

    name: str

    async def fuse(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> str: ...

    def fuse_stream(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> AsyncIterator[str]:
        """The same text as ``fuse``, in pieces as soon as each is final."""
        ...

    async def count_tokens(self, text: str) -> int | None:
        """``text``'s tokens by the fuser's own tokenizer (a fused answer's usage), off the event
        loop; None where the fuser cannot tell."""
        ...

    def close(self) -> None: ...


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
    """Mixture-of-Agents-style aggregation by any OpenAI-compatible model (kind ``llm``)."""

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
        endpoint = MemberConfig.model_validate(
            {
                "name": name,
                "endpoint": base_url,
                "model": config.model,
                "sampling": config.sampling,
                "timeout_s": config.timeout_s,
                "api_key_env": config.api_key_env,
            }
        )
        self._endpoint = OpenAIMember(endpoint, base_url, client, gate)
        self._client = client
        # vLLM serves /tokenize beside /v1; other servers may not (then the count is None).
        self._tokenize_url = base_url.rstrip("/").removesuffix("/v1") + "/tokenize"

    def close(self) -> None:
        pass

    async def count_tokens(self, text: str) -> int | None:
        body = {"model": self.config.model, "prompt": text, "add_special_tokens": False}
        try:
            r = await self._client.post(
                self._tokenize_url, json=body, headers=self._endpoint.headers, timeout=self.config.timeout_s
            )
            count = r.json().get("count") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return count if isinstance(count, int) else None

    async def fuse(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> str:
        request = self._request(instruction, input_text, candidates, max_new_tokens)
        try:
            completion = await self._endpoint.generate(request)
        except MemberFailure as e:
            raise ModelError(f"llm fuser {self.name}: {e}") from e
        return completion.text

    def _request(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None
    ) -> MemberRequest:
        s = self.config.sampling
        return MemberRequest(
            messages=aggregation_messages(self.config.template, instruction, input_text, candidates),
            max_tokens=min(s.max_tokens, max_new_tokens) if max_new_tokens else s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
        )

    async def fuse_stream(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> AsyncIterator[str]:
        request = self._request(instruction, input_text, candidates, max_new_tokens)
        try:
            async for piece in self._endpoint.generate_stream(request):
                yield piece
        except MemberFailure as e:
            raise ModelError(f"llm fuser {self.name}: {e}") from e
