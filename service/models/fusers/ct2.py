"""CTranslate2 as the GenFuser's engine (opt-in: ``fusers.<name>.engine: ctranslate2``).

The T5 checkpoint is converted once with CTranslate2's own converter into the gateway's cache (one
folder per checkpoint contents and CTranslate2 version) and run by its ``Translator``: beam search in
C++ on the CPU or GPU, ``compute_type`` (int8, float16, ...) chosen at load. The fuser's input is the
same token sequence the torch path feeds ``generate``; CTranslate2's beam search stops once the best
finished hypothesis cannot be beaten (transformers' ``early_stopping=True``), where ``Blender.fuse``'s
transformers defaults keep searching, so a few fused texts differ from ``Blender.fuse``'s (measured in
``make bench``); the token ids equal transformers' ``generate`` with ``early_stopping=True``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.config import FuserConfig
from service.errors import ConfigError
from service.models.build.cache import publish, staging, tree_fingerprint

if TYPE_CHECKING:
    from service.models.fusers.prefix import FinalPrefix
    from service.models.fusers.t5decode import Decode

logger = logging.getLogger(__name__)


def converted(checkpoint: str, cache: Path) -> Path:
    """``checkpoint`` in CTranslate2's format under ``cache`` (converted once; an atomic rename)."""
    try:
        import ctranslate2
    except ImportError as e:
        raise ConfigError(
            "engine ctranslate2: CTranslate2 is not installed (pip install 'ensemble-gateway[ct2]')"
        ) from e
    if not Path(checkpoint).is_dir():
        raise ConfigError(f"engine ctranslate2: {checkpoint} is not a local directory (convert needs the files)")
    digest = hashlib.sha256(f"{metadata.version('ctranslate2')}\0{tree_fingerprint(checkpoint)}".encode())
    out = cache / "ct2" / digest.hexdigest()[:24]
    if (out / "model.bin").exists():
        return out
    start = time.perf_counter()
    with staging(out) as tmp:
        ctranslate2.converters.TransformersConverter(checkpoint).convert(str(tmp / "model"), force=True)
        publish(tmp / "model", out, "model.bin")
    logger.info("converted %s for CTranslate2 in %.1fs: %s", checkpoint, time.perf_counter() - start, out)
    return out


class CT2Engine:
    """A converted T5 in a ``ctranslate2.Translator``: token ids in, the best beam's token ids out,
    whole (it has no per-step hook: a stream gets the text in one piece at the end)."""

    kind = "ctranslate2"

    def __init__(self, config: FuserConfig, threads: int, cache: Path, tokenizer: Any):
        import ctranslate2

        kind, _, index = config.device.partition(":")
        self.num_beams = config.num_beams
        self.tokenizer = tokenizer
        self.translator = ctranslate2.Translator(
            str(converted(config.checkpoint, cache)),
            device=kind,
            device_index=int(index or 0),
            compute_type=config.compute_type,
            intra_threads=threads if kind == "cpu" else 0,
        )

    def start(self, enc: Any, max_new_tokens: int, watcher: FinalPrefix | None) -> Decode | list[int]:
        return self.generate(enc["input_ids"][0].tolist(), self.num_beams, max_new_tokens)

    def complete(self, started: Decode | list[int]) -> list[int]:
        assert isinstance(started, list)  # CTranslate2 finishes in start
        return started

    def generate(self, ids: list[int], num_beams: int, max_new_tokens: int) -> list[int]:
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        result = self.translator.translate_batch(
            [tokens], beam_size=num_beams, max_decoding_length=max_new_tokens, num_hypotheses=1
        )
        out: list[int] = self.tokenizer.convert_tokens_to_ids(result[0].hypotheses[0])
        return out
