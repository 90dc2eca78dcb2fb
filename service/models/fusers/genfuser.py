"""GenFuser: llm-blender's T5 fuser, behind one worker thread.

``GenFuser`` reproduces llm-blender's ``Blender.fuse`` token for token: the same input text
(``GenFuserDataset``'s format), the same truncation of each candidate, the same generation
settings (``num_beams=4``, ``max_new_tokens`` = the candidate limit) and the same decoding. Its
beam search skips one thing ``Blender.fuse`` spends time on: reordering the cross-attention cache,
whose rows are the same for every beam (``FuserConfig.shared_cross_cache``). For a T5 it runs its
own decode loop (``t5decode``, ``FuserConfig.lean_decode``): the same search on the model's weights
without transformers' per-step machinery. Which engine runs a fusion is ``engines``' choice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.config import FuserConfig
from service.models.fusers.prefix import FinalPrefix

if TYPE_CHECKING:
    from service.models.fusers.engines import Engine
    from service.models.fusers.fusebatch import FusionBatcher
    from service.models.fusers.t5decode import Decode

logger = logging.getLogger(__name__)


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
        from transformers import AutoTokenizer

        from service.models.build.cache import default_cache_root
        from service.models.fusers.engines import LeanEngine, load_engine
        from service.models.fusers.fusebatch import FusionBatcher

        self.name = name
        self.config = config
        start = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(config.checkpoint)
        # The worker's thread budget, set in it when it starts (see FuserConfig.threads).
        self.threads = config.threads or torch.get_num_threads()
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"fuser-{name}",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self._counter = self._counting_tokenizer()
        self.engine: Engine = load_engine(name, config, self.tokenizer, self.threads, cache or default_cache_root())
        # Concurrent fusions share the lean decoder's steps (continuous batching on the worker).
        self.batcher: FusionBatcher | None = None
        if isinstance(self.engine, LeanEngine) and config.max_batch_requests > 1:
            self.batcher = FusionBatcher(
                self.engine.lean, self._executor, config.max_batch_requests, config.max_batch_tokens
            )
        logger.info("fuser %s loaded in %.1fs (%s engine)", name, time.perf_counter() - start, self.engine.kind)

    def thread_budget(self) -> int:
        """The torch threads the fuser's worker thread runs with (asked of the thread itself)."""
        import torch

        return self._executor.submit(torch.get_num_threads).result()

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
        if self.batcher is not None:
            start, finish = self._fusion(instruction, input_text, list(candidates), None, None, max_new_tokens)
            return await asyncio.wrap_future(self.batcher.submit(start, finish))
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
        if self.batcher is not None:
            start, finish = self._fusion(instruction, input_text, list(candidates), push, cancel, max_new_tokens)
            done = self.batcher.submit(start, finish)
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
        return finish(self.engine.complete(got))

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
            watcher = FinalPrefix(self.tokenizer, on_text, cancel)

        def start() -> Decode | list[int]:
            text = genfuser_input(self.tokenizer, instruction, input_text, candidates, cfg.candidate_max_length)
            enc = self.tokenizer(
                text, max_length=cfg.max_length, truncation=True, add_special_tokens=False, return_tensors="pt"
            )
            limit = cfg.max_new_tokens or cfg.candidate_max_length
            return self.engine.start(enc, min(limit, max_new_tokens) if max_new_tokens else limit, watcher)

        def finish(ids: list[int]) -> str:
            text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
            if watcher is not None and on_text is not None:
                if not text.startswith(watcher.sent):
                    # Cannot happen if the prefix rule holds; logged loudly rather than hidden.
                    logger.error("streamed text is not a prefix of the fused text; sending the rest as is")
                on_text(text[len(watcher.sent) :])
            return text

        return start, finish
