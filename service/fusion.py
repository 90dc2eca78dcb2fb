"""Fusers: turn the top-ranked candidates into one answer.

``GenFuser`` reproduces llm-blender's ``Blender.fuse`` token for token: the same input text
(``GenFuserDataset``'s format), the same truncation of each candidate, the same generation
settings (``num_beams=4``, ``max_new_tokens`` = the candidate limit) and the same decoding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import httpx

from service.config import FuserConfig, LLMFuserConfig, MemberConfig
from service.errors import ModelError
from service.gate import ClassGate
from service.members import MemberFailure, MemberRequest, OpenAIMember
from service.ranking import torch_dtype

logger = logging.getLogger(__name__)


class Fuser(Protocol):
    """Fuses candidates (best first) for an instruction and input into one text.

    ``fuse`` raises ``ModelError`` on failure and runs its model work off the event loop.
    """

    name: str

    async def fuse(self, instruction: str, input_text: str, candidates: list[str]) -> str: ...

    def close(self) -> None: ...


def genfuser_input(
    tokenizer: object, instruction: str, input_text: str, candidates: list[str], cand_max: int
) -> str:
    """The GenFuser prompt, exactly as llm-blender's ``GenFuserDataset`` builds it."""
    cut = []
    for cand in candidates:
        ids = tokenizer.encode(cand, add_special_tokens=False)  # type: ignore[attr-defined]
        if len(ids) > cand_max:
            cand = tokenizer.decode(ids[:cand_max]) + "..."  # type: ignore[attr-defined]
        cut.append(cand)
    parts = [
        "Instruction: " + instruction,
        "Input: " + input_text,
        "</s>".join(f"Candidate {i}: <extra_id_{i}>:" + c for i, c in enumerate(cut)),
    ]
    return "</s>".join(parts) + "</s>Summarize candidates into a better one for the given instruction:"


class GenFuser:
    """A seq2seq fuser (GenFuser, e.g. ``llm-blender/gen_fuser_3b``) from a directory or hub id."""

    def __init__(self, name: str, config: FuserConfig):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.name = name
        self.config = config
        self._torch = torch
        start = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(config.checkpoint)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(
            config.checkpoint, dtype=torch_dtype(config.dtype)
        ).to(config.device)
        self.model.eval()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fuser-{name}")
        logger.info("fuser %s loaded in %.1fs", name, time.perf_counter() - start)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def fuse(self, instruction: str, input_text: str, candidates: list[str]) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.fuse_sync, instruction, input_text, candidates)

    def fuse_sync(self, instruction: str, input_text: str, candidates: list[str]) -> str:
        cfg = self.config
        text = genfuser_input(
            self.tokenizer, instruction, input_text, list(candidates), cfg.candidate_max_length
        )
        enc = self.tokenizer(
            text,
            max_length=cfg.max_length,
            truncation=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        with self._torch.inference_mode():
            out = self.model.generate(
                input_ids=enc["input_ids"].to(cfg.device),
                attention_mask=enc["attention_mask"].to(cfg.device),
                num_beams=cfg.num_beams,
                max_new_tokens=cfg.max_new_tokens or cfg.candidate_max_length,
                num_return_sequences=1,
            )
        return str(self.tokenizer.batch_decode(out, skip_special_tokens=True)[0])


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

    def close(self) -> None:
        pass

    async def fuse(self, instruction: str, input_text: str, candidates: list[str]) -> str:
        s = self.config.sampling
        request = MemberRequest(
            messages=aggregation_messages(self.config.template, instruction, input_text, candidates),
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
        )
        try:
            completion = await self._endpoint.generate(request)
        except MemberFailure as e:
            raise ModelError(f"llm fuser {self.name}: {e}") from e
        return completion.text
