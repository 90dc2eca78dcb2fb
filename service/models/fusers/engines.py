"""GenFuser's engines, one class each: transformers' ``generate`` (any seq2seq checkpoint), the
lean T5 decoder (``t5decode``; a request whose settings it does not implement takes ``generate``),
and CTranslate2 (``ct2``). An engine turns one fusion's encoded input into a lean ``Decode`` to
step (alone, or in a shared step: ``fusebatch``) or the finished token ids; ``complete`` finishes
what ``start`` began, alone."""

from __future__ import annotations

import functools
import logging
import types
from pathlib import Path
from typing import Any, Protocol

import torch

from service.config import FuserConfig
from service.models.compat import torch_dtype
from service.models.fusers.prefix import FinalPrefix
from service.models.fusers.products import SKINNY_MIN_WEIGHTS, SKINNY_ROWS, skinny_linear
from service.models.fusers.t5decode import Decode, LeanT5

logger = logging.getLogger(__name__)


class Engine(Protocol):
    kind: str  # generate | lean | ctranslate2

    def start(self, enc: Any, max_new_tokens: int, watcher: FinalPrefix | None) -> Decode | list[int]: ...

    def complete(self, started: Decode | list[int]) -> list[int]: ...


def load_engine(name: str, config: FuserConfig, tokenizer: Any, threads: int, cache: Path) -> Engine:
    """The engine ``config`` asks for, loaded (on the calling thread: call it off the event loop)."""
    if config.engine == "ctranslate2":
        from service.models.fusers.ct2 import CT2Engine

        return CT2Engine(config, threads, cache, tokenizer)
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(config.checkpoint, dtype=torch_dtype(config.dtype))
    model = model.to(config.device).eval()
    skinny = config.skinny_products and config.device == "cpu"
    if skinny and model.config.is_encoder_decoder:
        for module in [*model.get_decoder().modules(), model.get_output_embeddings()]:
            if isinstance(module, torch.nn.Linear) and module.weight.numel() >= SKINNY_MIN_WEIGHTS:
                module.forward = types.MethodType(skinny_linear, module)  # type: ignore[method-assign]
    if config.lean_decode:
        reason = LeanT5.unsupported_model(model)
        if reason is None:
            return LeanEngine(model, config, LeanT5(model, SKINNY_MIN_WEIGHTS if skinny else None, SKINNY_ROWS))
        logger.info("fuser %s: transformers' generate, no lean decode (%s)", name, reason)
    return GenerateEngine(model, config)


class GenerateEngine:
    """transformers' ``generate``, as ``Blender.fuse`` calls it (with the cross-attention cache
    shared by the beams where ``shared_cross_cache`` is on)."""

    kind = "generate"

    def __init__(self, model: Any, config: FuserConfig):
        self.model = model
        self.config = config

    def start(self, enc: Any, max_new_tokens: int, watcher: FinalPrefix | None) -> Decode | list[int]:
        return self.generate(enc, max_new_tokens, watcher)

    def complete(self, started: Decode | list[int]) -> list[int]:
        assert isinstance(started, list)  # generate finishes in start
        return started

    def generate(self, enc: Any, max_new_tokens: int, watcher: FinalPrefix | None) -> list[int]:
        cfg = self.config
        extra: dict[str, Any] = {}
        if cfg.shared_cross_cache and self.model.config.is_encoder_decoder:
            extra["past_key_values"] = shared_cross_cache()
        if watcher is not None:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([watcher])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=enc["input_ids"].to(cfg.device),
                attention_mask=enc["attention_mask"].to(cfg.device),
                num_beams=cfg.num_beams,
                max_new_tokens=max_new_tokens,
                num_return_sequences=1,
                **extra,
            )
        return list(out[0].tolist())


class LeanEngine(GenerateEngine):
    """The lean T5 decoder (``service.models.fusers.t5decode``): a ``Decode`` to step, or
    ``generate`` for a request whose generation settings it does not implement."""

    kind = "lean"

    def __init__(self, model: Any, config: FuserConfig, lean: LeanT5):
        super().__init__(model, config)
        self.lean = lean

    def start(self, enc: Any, max_new_tokens: int, watcher: FinalPrefix | None) -> Decode | list[int]:
        plan = self.lean.prepare(self.config.num_beams, max_new_tokens, num_return_sequences=1)
        if isinstance(plan, str):
            logger.debug("fuser: transformers' generate (%s)", plan)
            return self.generate(enc, max_new_tokens, watcher)
        device = self.config.device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        decode = self.lean.start(ids, mask, plan, on_step=watcher.step if watcher else None)
        return decode if decode is not None else self.generate(enc, max_new_tokens, watcher)

    def complete(self, started: Decode | list[int]) -> list[int]:
        return started if isinstance(started, list) else self.lean.run(started)


def shared_cross_cache() -> Any:
    """An encoder-decoder cache whose beam reordering skips the cross-attention part.

    Its keys and values are projections of the encoder output, which generate copies once per
    beam: every beam's rows are the same, so reordering them (two copies per layer and step, the
    size of the encoder output times the beams) changes nothing but the time it takes.
    """
    from transformers.cache_utils import DynamicCache

    return _shared_cross_cache_class()(DynamicCache(), DynamicCache())


@functools.cache
def _shared_cross_cache_class() -> Any:
    from transformers.cache_utils import EncoderDecoderCache

    class SharedCrossCache(EncoderDecoderCache):
        def reorder_cache(self, beam_idx: Any) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    return SharedCrossCache
