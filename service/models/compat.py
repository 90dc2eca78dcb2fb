"""Shims for outside packages that misbehave, each with the reason in one sentence; and the
config's dtype names as torch dtypes."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


def ensure_transformers_cache() -> None:
    """llm-blender 0.0.2 imports ``transformers.utils.hub.TRANSFORMERS_CACHE``, which
    transformers 5 removed (llm-blender issue #33): the name is restored before importing it."""
    import transformers.utils.hub as hub

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub.constants import HF_HUB_CACHE

        hub.TRANSFORMERS_CACHE = HF_HUB_CACHE  # type: ignore[attr-defined]


def import_llm_blender(module: str) -> ModuleType:
    """Import a module of llm-blender (e.g. ``llm_blender.pair_ranker.pairrm``).

    llm-blender's package ``__init__`` imports vLLM only to detect it (seconds and gigabytes for a
    path the gateway never takes), so vLLM is hidden for the duration of the import.
    """
    ensure_transformers_cache()
    hidden = "vllm" not in sys.modules
    if hidden:
        sys.modules["vllm"] = None  # type: ignore[assignment]
    try:
        return importlib.import_module(module)
    finally:
        if hidden and sys.modules.get("vllm", 0) is None:
            del sys.modules["vllm"]


def import_pairrm() -> Any:
    """llm-blender's ``DebertaV2PairRM`` class."""
    return import_llm_blender("llm_blender.pair_ranker.pairrm").DebertaV2PairRM


def load_pairrm(checkpoint: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """A PairRM-hf checkpoint's tokenizer and ``DebertaV2PairRM``, for inference (eval mode, no gradients)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = import_pairrm().from_pretrained(checkpoint, dtype=torch_dtype(dtype)).to(device)
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model


def torch_dtype(name: str) -> Any:
    """``float32`` / ``float16`` / ``bfloat16`` as the torch dtype."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
