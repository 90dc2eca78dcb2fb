"""llm-blender as its users run it: ``Blender.rank`` and ``Blender.fuse``, on the same weights.

``Blender.loadranker`` reads llm-blender's original ranker format, not PairRM-hf: a directory
with llm-blender's ``RankerConfig`` as ``config.json``, the whole ranker's weights
(``model.safetensors``), and ``model_name`` naming the backbone it builds first. The PairRM-hf
checkpoint holds the same modules under the same names (``pretrained_model.*``, ``head_layer.*``),
so ``write_blender_ranker`` only re-packages it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.models.compat import import_llm_blender, import_pairrm

_DONE = ".complete"


def write_blender_ranker(pairrm_hf: Path, out: Path) -> Path:
    """Write ``pairrm_hf`` (a PairRM-hf directory) in llm-blender's original ranker format."""
    import safetensors.torch
    from transformers import AutoTokenizer

    if (out / _DONE).exists():
        return out
    model = import_pairrm().from_pretrained(pairrm_hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(pairrm_hf)
    backbone = out / "backbone"
    backbone.mkdir(parents=True, exist_ok=True)
    model.pretrained_model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    safetensors.torch.save_model(model, str(out / "model.safetensors"))
    config = {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": str(backbone.resolve()),
        "source_maxlength": 1224,
        "candidate_maxlength": 412,
        "n_tasks": model.config.n_tasks,
        "drop_out": model.config.drop_out,
        "inference_mode": "full",
        "fp16": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / _DONE).write_text("1")
    return out


def _restore_batch_encode_plus(tokenizer: Any) -> None:
    """llm-blender's collator calls ``batch_encode_plus``, which transformers 5 removed; calling
    the tokenizer on a list of texts is what it did."""
    if not hasattr(type(tokenizer), "batch_encode_plus"):
        tokenizer.batch_encode_plus = lambda texts, **kw: tokenizer(texts, **kw)


def blender_ranker(blender_format_dir: Path, device: str = "cpu", dtype: str = "float32") -> Any:
    """``Blender.loadranker`` on ``device``. It loads float32 (float16 only with its own fp16 flag);
    another ``dtype`` is a cast of the loaded ranker, so that both sides compute in the same precision."""
    import torch

    blender = import_llm_blender("llm_blender.blender.blender").Blender()
    blender.blender_config.use_tqdm = False
    blender.loadranker(str(blender_format_dir), device=device)
    if dtype != "float32":
        blender.ranker = blender.ranker.to(getattr(torch, dtype))
    _restore_batch_encode_plus(blender.ranker_tokenizer)
    return blender


def blender_fuser(checkpoint: Path, device: str = "cpu", dtype: str = "float32") -> Any:
    blender = import_llm_blender("llm_blender.blender.blender").Blender()
    blender.blender_config.use_tqdm = False
    blender.loadfuser(str(checkpoint), device=device, torch_dtype=dtype)
    return blender


def blender_rank_scores(blender: Any, sources: list[str], candidates: list[list[str]], batch_size: int = 8) -> Any:
    """``Blender.rank`` with its defaults (batch of 8 inputs), scores rather than ranks."""
    return blender.rank(sources, candidates, return_scores=True, batch_size=batch_size, disable_tqdm=True)


def blender_fuse(blender: Any, instruction: str, input_text: str, candidates: list[str], **generate: Any) -> str:
    """``Blender.fuse`` as llm-blender's README calls it, for one input (``generate``: its
    generation overrides, e.g. ``max_new_tokens``)."""
    out = blender.fuse([input_text], [list(candidates)], instructions=[instruction], batch_size=1, **generate)
    return str(out[0])
