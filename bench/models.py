"""Random-weight checkpoints of the real models' shapes, built in memory (no hub), saved once.

The tokenizers are the tiny ones: what costs time is the number of tokens and the layers' shapes,
not the vocabulary. The heads get the tiny PairRM's wider init, so scores are of order one and a
parity check at 1e-4 still means something.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAIRRM_SHAPES: dict[str, dict[str, int]] = {
    # DeBERTa-v3-large is PairRM's backbone; base is the fallback when large does not fit the time.
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    # For the smoke run only: seconds, not minutes.
    "mini": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256},
}

FUSER_SHAPES: dict[str, dict[str, int]] = {
    # Flan-T5-base (GenFuser is Flan-T5-XL, far beyond these CPUs).
    "t5-base": {"d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12},
    # Flan-T5-XL, GenFuser's own shape (2.85 B parameters): for a GPU (python -m bench.gpu).
    "t5-xl": {"d_model": 2048, "d_kv": 64, "d_ff": 5120, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 32},
    "mini": {"d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
}

_DONE = ".complete"


def _fresh(out: Path, stamp: dict[str, Any]) -> bool:
    marker = out / _DONE
    return marker.exists() and marker.read_text() == json.dumps(stamp, sort_keys=True)


def make_pairrm_shaped(out: Path, tiny: Path, shape: str, seed: int = 1234) -> Path:
    """A PairRM-hf checkpoint with DeBERTa-v3 ``shape`` dimensions and the tiny PairRM's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from service.models.compat import import_pairrm

    stamp = {"kind": "pairrm", "shape": shape, "seed": seed}
    if _fresh(out, stamp):
        return out
    config = AutoConfig.from_pretrained(tiny)
    for key, value in PAIRRM_SHAPES[shape].items():
        setattr(config, key, value)
    config.initializer_range = 0.02
    torch.manual_seed(seed)
    model = import_pairrm()(config).eval()
    with torch.no_grad():
        for layer in model.head_layer:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.5 / (layer.in_features / 128) ** 0.5)
                layer.bias.normal_(0.0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    (out / _DONE).write_text(json.dumps(stamp, sort_keys=True))
    return out


def make_fuser_shaped(out: Path, tiny: Path, shape: str, seed: int = 4321, dtype: str = "float32") -> Path:
    """A T5 GenFuser with ``shape`` dimensions, gated-GELU like Flan-T5, the tiny fuser's tokenizer,
    saved in ``dtype`` (a 3 B model in bfloat16 is half the disk and load time of float32)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, T5ForConditionalGeneration

    stamp = {"kind": "fuser", "shape": shape, "seed": seed, **({"dtype": dtype} if dtype != "float32" else {})}
    if _fresh(out, stamp):
        return out
    config = AutoConfig.from_pretrained(tiny)
    for key, value in FUSER_SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3 / (config.d_model / 64) ** 0.5)
        # As in the tiny fuser: a damped end-of-sequence row, so answers run long as fused answers do.
        model.lm_head.weight[tok.eos_token_id] *= 0.1
    model.generation_config = GenerationConfig(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / _DONE).write_text(json.dumps(stamp, sort_keys=True))
    return out
