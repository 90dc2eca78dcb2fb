"""Soft-prompt members (PEFT prompt tuning over a vLLM server started with
``--enable-prompt-embeds``): the base model's tokenizer and input embeddings, loaded once per base
and shared, and the member that sends ``[virtual tokens ‖ embedded prompt]`` as ``prompt_embeds``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.config import MemberConfig, SoftPromptMemberConfig
from service.errors import ConfigError, MemberFailure
from service.members.base import MemberRequest
from service.members.gate import ClassGate
from service.members.openai import OpenAIMember

logger = logging.getLogger(__name__)


def load_prompt_embeddings(member: SoftPromptMemberConfig) -> Any:
    """PEFT's ``prompt_embeddings`` tensor [num_virtual_tokens, hidden]."""
    import torch
    from safetensors import safe_open

    assert member.adapter is not None
    directory = Path(member.adapter)
    st = directory / "adapter_model.safetensors"
    try:
        if st.exists():
            with safe_open(str(st), framework="pt") as f:
                tensor = f.get_tensor("prompt_embeddings")
        else:
            tensor = torch.load(directory / "adapter_model.bin", map_location="cpu")["prompt_embeddings"]
    except (OSError, KeyError, RuntimeError) as e:
        raise ConfigError(f"members.{member.name}.adapter: no prompt_embeddings in {directory}: {e}") from e
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise ConfigError(
            f"members.{member.name}.adapter: prompt_embeddings must be a 2-D float tensor, "
            f"got {tuple(tensor.shape)} {tensor.dtype}"
        )
    return tensor


def _embedding_key(names: list[str]) -> str:
    for suffix in ("embed_tokens.weight", "wte.weight", "word_embeddings.weight"):
        hits = [n for n in names if n.endswith(suffix) and "lm_head" not in n]
        if hits:
            return sorted(hits, key=len)[0]
    raise KeyError("no input-embedding tensor (…embed_tokens.weight) in the checkpoint")


def load_input_embeddings(base: str) -> Any:
    """Only the input-embedding matrix of a base checkpoint (safetensors loads one tensor)."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    root = Path(base)
    if not root.exists():
        root = Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        key = _embedding_key(list(weight_map))
        shard = root / weight_map[key]
    else:
        shard = root / "model.safetensors"
        with safe_open(str(shard), framework="pt") as f:
            key = _embedding_key(list(f.keys()))
    with safe_open(str(shard), framework="pt") as f:
        return f.get_tensor(key)


@dataclass
class BaseModelInputs:
    """A base model's tokenizer and input embeddings, loaded once and shared by its soft prompts."""

    checkpoint: str
    tokenizer: Any
    embeddings: Any  # [vocab, hidden]
    executor: ThreadPoolExecutor

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            from service.members.base import render_prompt

            text = render_prompt(messages)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def embeds_b64(self, prompt_embeddings: Any, messages: list[dict[str, str]]) -> str:
        """base64(torch.save([virtual tokens ‖ embeddings of the prompt tokens])), checked."""
        import torch

        ids = self.prompt_ids(messages)
        if ids and max(ids) >= self.embeddings.shape[0]:
            raise ValueError(f"token id {max(ids)} outside the embedding matrix")
        words = self.embeddings[torch.tensor(ids, dtype=torch.long)]
        tensor = torch.cat([prompt_embeddings.to(self.embeddings.dtype), words], dim=0).contiguous()
        if tensor.ndim != 2 or tensor.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"prompt_embeds has shape {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError("prompt_embeds has non-finite values")
        buf = io.BytesIO()
        torch.save(tensor, buf)
        return base64.b64encode(buf.getvalue()).decode("ascii")


class BaseModelCache:
    """One ``BaseModelInputs`` per base checkpoint."""

    def __init__(self) -> None:
        self._bases: dict[str, BaseModelInputs] = {}
        self._lock = threading.Lock()

    def get(self, checkpoint: str) -> BaseModelInputs:
        with self._lock:
            if checkpoint not in self._bases:
                from transformers import AutoTokenizer

                start = time.perf_counter()
                tokenizer = AutoTokenizer.from_pretrained(checkpoint)
                embeddings = load_input_embeddings(checkpoint)
                self._bases[checkpoint] = BaseModelInputs(
                    checkpoint,
                    tokenizer,
                    embeddings,
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="soft-prompt"),
                )
                logger.info(
                    "input embeddings of %s loaded in %.1fs: %s",
                    checkpoint,
                    time.perf_counter() - start,
                    tuple(embeddings.shape),
                )
            return self._bases[checkpoint]

    def close(self) -> None:
        for base in self._bases.values():
            base.executor.shutdown(wait=False, cancel_futures=True)


class SoftPromptMember(OpenAIMember):
    """A prompt-tuning checkpoint over a base model served with ``--enable-prompt-embeds``.

    The prompt is tokenized with the base tokenizer (chat template applied), embedded with the
    base's input-embedding matrix, prefixed with the soft prompt's virtual tokens, and sent as
    ``prompt_embeds`` to ``/v1/completions``. Tensor work runs on the base's own thread.
    """

    gate_class = "embeds"

    def __init__(
        self,
        config: MemberConfig,
        base_url: str,
        client: httpx.AsyncClient,
        base: BaseModelInputs,
        prompt_embeddings: Any,
        gate: ClassGate | None = None,
    ):
        super().__init__(config, base_url, client, gate)
        self.base = base
        self.prompt_embeddings = prompt_embeddings

    async def _payload(self, request: MemberRequest) -> tuple[str, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        try:
            embeds = await loop.run_in_executor(
                self.base.executor, self.base.embeds_b64, self.prompt_embeddings, self._messages(request)
            )
        except (ValueError, RuntimeError) as e:
            raise MemberFailure("invalid_request", f"cannot build prompt_embeds: {e}", e) from e
        body = self._sampling(request)
        body["prompt_embeds"] = embeds
        return f"{self.base_url}/completions", body

    def _choice_text(self, choice: dict[str, Any]) -> Any:
        return choice["text"]
