"""GenFuser: llm-blender's T5 fuser, behind one worker thread.

``GenFuser`` reproduces llm-blender's ``Blender.fuse`` token for token: the same input text
(``GenFuserDataset``'s format), the same truncation of each candidate, the same generation
settings (``num_beams=4``, ``max_new_tokens`` = the candidate limit) and the same decoding. Its
beam search skips one thing ``Blender.fuse`` spends time on: reordering the cross-attention cache,
whose rows are the same for every beam (``FuserConfig.shared_cross_cache``). For a T5 it runs its
own decode loop (``service.models.t5decode``, ``FuserConfig.lean_decode``): the same search on the model's
weights without transformers' per-step machinery.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import types
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.config import FuserConfig
from service.models.compat import torch_dtype

if TYPE_CHECKING:
    from service.models.fusebatch import FusionBatcher
    from service.models.t5decode import Decode

logger = logging.getLogger(__name__)


class _FinalPrefix:
    """A stopping criterion that never stops generation: it watches beam search and reports text
    as soon as it is final.

    Each step, beam search hands the stopping criteria all its top continuations: every sequence
    that stays in the beam and every one that may finish at this step. The output is one of the
    finished ones, and each finished one was such a continuation at its last step. So tokens that
    all current continuations and all continuations ever seen ending in EOS agree on are final.
    Text is held back while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None, cancel: threading.Event | None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.cancel = cancel
        self.eos = tokenizer.eos_token_id
        self.ended: list[list[int]] = []
        self.sent = ""

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = self.step(input_ids.tolist())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def step(self, seqs: list[list[int]]) -> bool:
        """One step's continuations (decoder start token first); True: stop (cancelled)."""
        stop = self.cancel is not None and self.cancel.is_set()
        if self.on_text is not None and not stop:
            self.ended.extend(s for s in seqs if s and s[-1] == self.eos)
            prefix = _common_prefix(seqs + self.ended)[1:]  # drop the decoder start token
            text = self.tokenizer.decode(prefix, skip_special_tokens=True).rstrip("\ufffd")
            if len(text) > len(self.sent) and text.startswith(self.sent):
                self.on_text(text[len(self.sent) :])
                self.sent = text
        return stop


SKINNY_ROWS = 16
SKINNY_MIN_WEIGHTS = 1 << 18  # smaller weights stay in cache, where the plain product is as fast


def _skinny_linear(self: Any, x: Any) -> Any:
    """``nn.Linear.forward`` for a decoder step on a CPU: with a few rows (one per beam),
    weight @ xᵀ streams each weight matrix from memory once, where x @ weightᵀ (transformers'
    product) reaches about a third of the memory bandwidth; longer inputs take the usual path."""
    import torch

    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.weight.shape[0])


def _shared_cross_cache() -> Any:
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


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return first[:i]
    return first[:n]


def genfuser_input(tokenizer: object, instruction: str, input_text: str, candidates: list[str], cand_max: int) -> str:
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

    def __init__(self, name: str, config: FuserConfig, cache: Path | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        self.name = name
        self.config = config
        self._torch = torch
        start = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(config.checkpoint)
        self._lean: Any = None
        self._batcher: FusionBatcher | None = None
        self._ct2: Any = None
        self.model: Any = None  # transformers' model; None with the CTranslate2 engine
        self.model_config: Any = None  # the checkpoint's config, either way
        # The worker's thread budget, set in it when it starts (see FuserConfig.threads).
        self.threads = config.threads or torch.get_num_threads()
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"fuser-{name}",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self._counter = self._counting_tokenizer()
        if config.engine == "ctranslate2":
            from service.models.cache import default_cache_root
            from service.models.ct2fuser import CT2Engine

            cache = cache or default_cache_root()
            self._ct2 = CT2Engine(
                config.checkpoint, config.device, config.compute_type, self.threads, cache, self.tokenizer
            )
            self.model_config = AutoConfig.from_pretrained(config.checkpoint)
            logger.info(
                "fuser %s loaded in %.1fs (CTranslate2, %s)", name, time.perf_counter() - start, config.compute_type
            )
            return
        self.model = AutoModelForSeq2SeqLM.from_pretrained(config.checkpoint, dtype=torch_dtype(config.dtype)).to(
            config.device
        )
        self.model.eval()
        self.model_config = self.model.config
        skinny = config.skinny_products and config.device == "cpu"
        if skinny and self.model.config.is_encoder_decoder:
            for module in [*self.model.get_decoder().modules(), self.model.get_output_embeddings()]:
                if isinstance(module, torch.nn.Linear) and module.weight.numel() >= SKINNY_MIN_WEIGHTS:
                    module.forward = types.MethodType(_skinny_linear, module)  # type: ignore[method-assign]
        if config.lean_decode:
            from service.models.t5decode import LeanT5

            reason = LeanT5.unsupported_model(self.model)
            if reason is None:
                self._lean = LeanT5(self.model, SKINNY_MIN_WEIGHTS if skinny else None, SKINNY_ROWS)
                if config.max_batch_requests > 1:
                    from service.models.fusebatch import FusionBatcher

                    self._batcher = FusionBatcher(
                        self._lean, self._executor, config.max_batch_requests, config.max_batch_tokens
                    )
            else:
                logger.info("fuser %s: transformers' generate, no lean decode (%s)", name, reason)
        logger.info("fuser %s loaded in %.1fs", name, time.perf_counter() - start)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _counting_tokenizer(self) -> Any:
        """Counting an answer's tokens must not queue behind beam searches on the fuser's thread, nor
        share its tokenizer (which sets truncation per call: a Rust tokenizer used from two threads
        while one changes its settings raises "Already borrowed"): a copy that never truncates."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        counter = Tokenizer.from_str(backend.to_str())
        counter.no_truncation()
        counter.no_padding()
        return counter

    async def count_tokens(self, text: str) -> int | None:
        if self._counter is None:
            return None
        encoding = await asyncio.to_thread(self._counter.encode, text, add_special_tokens=False)
        return len(encoding.ids)

    async def fuse(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> str:
        if self._batcher is not None:
            start, finish = self._fusion(instruction, input_text, list(candidates), None, None, max_new_tokens)
            return await asyncio.wrap_future(self._batcher.submit(start, finish))
        loop = asyncio.get_running_loop()
        work = functools.partial(self.fuse_sync, instruction, input_text, candidates, max_new_tokens=max_new_tokens)
        return await loop.run_in_executor(self._executor, work)

    async def fuse_stream(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def push(piece: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        future: asyncio.Future[str]
        if self._batcher is not None:
            start, finish = self._fusion(instruction, input_text, list(candidates), push, cancel, max_new_tokens)
            done = self._batcher.submit(start, finish)
            done.add_done_callback(lambda _: push(None))
            future = asyncio.wrap_future(done)
        else:

            def work() -> str:
                try:
                    return self.fuse_sync(
                        instruction, input_text, candidates, on_text=push, cancel=cancel, max_new_tokens=max_new_tokens
                    )
                finally:
                    push(None)

            future = loop.run_in_executor(self._executor, work)
        try:
            while (piece := await queue.get()) is not None:
                yield piece
            await future
        finally:
            cancel.set()  # a client that went away stops the beam search at its next step

    def fuse_sync(
        self,
        instruction: str,
        input_text: str,
        candidates: list[str],
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        max_new_tokens: int | None = None,
    ) -> str:
        """One fusion on the calling thread, alone."""
        start, finish = self._fusion(instruction, input_text, list(candidates), on_text, cancel, max_new_tokens)
        got = start()
        return finish(got if isinstance(got, list) else self._lean.run(got))

    def _fusion(
        self,
        instruction: str,
        input_text: str,
        candidates: list[str],
        on_text: Callable[[str], None] | None,
        cancel: threading.Event | None,
        max_new_tokens: int | None,
    ) -> tuple[Callable[[], Decode | list[int]], Callable[[list[int]], str]]:
        """One fusion as two calls for the model's thread: ``start`` (the input, the encoder: a lean
        ``Decode`` to step, or the finished token ids by CTranslate2 or transformers' generate) and
        ``finish`` (token ids to the fused text, the rest of a stream sent)."""
        cfg = self.config
        watcher = None
        if on_text is not None or cancel is not None:
            watcher = _FinalPrefix(self.tokenizer, on_text, cancel)

        def start() -> Decode | list[int]:
            text = genfuser_input(self.tokenizer, instruction, input_text, candidates, cfg.candidate_max_length)
            enc = self.tokenizer(
                text, max_length=cfg.max_length, truncation=True, add_special_tokens=False, return_tensors="pt"
            )
            limit = cfg.max_new_tokens or cfg.candidate_max_length
            new_tokens = min(limit, max_new_tokens) if max_new_tokens else limit
            if self._ct2 is not None:  # no per-step hook: a stream gets the text in one piece at the end
                return list(self._ct2.generate(enc["input_ids"][0].tolist(), cfg.num_beams, new_tokens))
            input_ids, attention_mask = enc["input_ids"].to(cfg.device), enc["attention_mask"].to(cfg.device)
            decode = self._lean_start(input_ids, attention_mask, new_tokens, watcher)
            return decode if decode is not None else self._generate(input_ids, attention_mask, new_tokens, watcher)

        def finish(ids: list[int]) -> str:
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            if watcher is not None and on_text is not None:
                if not text.startswith(watcher.sent):
                    # Cannot happen if the prefix rule holds; logged loudly rather than hidden.
                    logger.error("streamed text is not a prefix of the fused text; sending the rest as is")
                on_text(text[len(watcher.sent) :])
            return text

        return start, finish

    def _generate(
        self, input_ids: Any, attention_mask: Any, max_new_tokens: int, watcher: _FinalPrefix | None
    ) -> list[int]:
        cfg = self.config
        extra: dict[str, Any] = {}
        if cfg.shared_cross_cache and self.model.config.is_encoder_decoder:
            extra["past_key_values"] = _shared_cross_cache()
        if watcher is not None:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([watcher])
        with self._torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=cfg.num_beams,
                max_new_tokens=max_new_tokens,
                num_return_sequences=1,
                **extra,
            )
        return list(out[0].tolist())

    def _lean_start(
        self, input_ids: Any, attention_mask: Any, max_new_tokens: int, watcher: _FinalPrefix | None
    ) -> Decode | None:
        """The lean decode path's decode (``service.models.t5decode``), or None where it does not
        apply (then transformers' ``generate`` runs)."""
        if self._lean is None:
            return None
        plan = self._lean.prepare(self.config.num_beams, max_new_tokens, num_return_sequences=1)
        if isinstance(plan, str):
            logger.debug("fuser %s: transformers' generate (%s)", self.name, plan)
            return None
        decode: Decode | None = self._lean.start(
            input_ids, attention_mask, plan, on_step=watcher.step if watcher else None
        )
        return decode
