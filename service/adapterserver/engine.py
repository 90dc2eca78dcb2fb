"""The model side of the adapter server: one base model, many ``adapters``-library adapters over it,
and one worker thread that owns them.

Requests wait in a queue; the worker takes every waiting greedy request for one adapter and runs
them as one left-padded ``generate`` (the same adapter in one batch: the library's ``Parallel``
composition runs several adapters over one batch in ``forward``, but its ``generate`` fails on any
padded batch, FACTS.md). A sampled request runs alone, seeded when it carries a seed, and so does a
streamed one. Blocking model work never runs on the event loop: callers await a future.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.adapterserver.patches import ATTENTION, load_config, load_tokenizer, patch_llama_cache

logger = logging.getLogger(__name__)

SUPPORTED = ("bottleneck", "prefix_tuning")


class AdapterError(ValueError):
    """An adapter directory this server cannot serve; the message says why."""


def adapter_architecture(path: str | Path, model_config: Any) -> str:
    """The architecture of the adapters-library adapter saved in ``path`` (``save_adapter``), checked
    against the served base; raises ``AdapterError`` naming what is wrong."""
    folder = Path(path)
    meta = folder / "adapter_config.json"
    if not folder.is_dir() or not meta.exists():
        raise AdapterError(
            f"{path} is not an adapters-library adapter (no adapter_config.json; save it with save_adapter)"
        )
    try:
        raw = json.loads(meta.read_text())
    except ValueError as e:
        raise AdapterError(f"{meta}: not JSON ({e})") from e
    if not str(raw.get("version", "")).startswith("adapters.") or not isinstance(raw.get("config"), dict):
        raise AdapterError(
            f"{path} is not an adapters-library adapter (adapter_config.json has no adapters version and config; "
            "a PEFT adapter belongs to a lora member)"
        )
    arch = _architecture(raw["config"])
    if arch not in SUPPORTED:
        raise AdapterError(f"{path}: adapter type {arch!r} is not served here; supported: {', '.join(SUPPORTED)}")
    for key in ("model_type", "hidden_size"):
        want, got = getattr(model_config, key, None), raw.get(key)
        if got is not None and want is not None and got != want:
            raise AdapterError(f"{path}: trained for a base with {key} {got}, this server's base has {want}")
    trained_on = raw.get("model_name")
    served = getattr(model_config, "name_or_path", "")
    if trained_on and served and Path(str(trained_on)).name != Path(str(served)).name:
        raise AdapterError(f"{path}: trained over base {trained_on!r}, this server serves {served!r}")
    return arch


def _architecture(config: dict[str, Any]) -> str:
    """The adapter type, as the library reads the saved config (a bottleneck adapter's config does
    not record ``architecture``; the library tells it by its config class)."""
    from adapters import AdapterConfig, BnConfig, PrefixTuningConfig

    try:
        loaded = AdapterConfig.load(config)
    except Exception:
        return str(config.get("architecture") or "unknown")
    if isinstance(loaded, BnConfig):
        return "bottleneck"
    if isinstance(loaded, PrefixTuningConfig):
        return "prefix_tuning"
    return str(getattr(loaded, "architecture", None) or type(loaded).__name__)


@dataclass
class Job:
    adapter: str | None  # None: the base model
    input_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    on_text: Callable[[str], None] | None = None  # set: stream, run alone
    cancel: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future[tuple[list[int], str]] = field(default_factory=concurrent.futures.Future)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Engine:
    def __init__(
        self,
        model_dir: str,
        adapters: dict[str, str],
        device: str = "cpu",
        dtype: str = "float32",
        max_batch: int = 8,
        threads: int | None = None,
    ) -> None:
        import adapters as adapters_lib
        import torch
        from transformers import AutoModelForCausalLM

        patch_llama_cache()
        self.torch = torch
        self.model_dir = model_dir
        self.max_batch = max_batch
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = load_config(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, config=config, attn_implementation=ATTENTION, dtype=getattr(torch, dtype)
        )
        self.model: Any = model.to(device)
        self.device = device
        adapters_lib.init(self.model)
        self.adapters: dict[str, str] = {}
        for name, path in adapters.items():
            try:
                arch = adapter_architecture(path, self.model.config)
            except AdapterError as e:
                raise AdapterError(f"adapter {name}: {e}") from e
            self.model.load_adapter(str(path), load_as=name, set_active=False)
            self.adapters[name] = arch
        self.model.eval()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._threads = threads
        self._worker = threading.Thread(target=self._run, name="adapter-engine", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> concurrent.futures.Future[tuple[list[int], str]]:
        if job.adapter is not None and job.adapter not in self.adapters:
            raise KeyError(job.adapter)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads:
            self.torch.set_num_threads(self._threads)
        pending: list[Job] = []
        while True:
            if not pending:
                job = self._queue.get()
                if job is None:
                    return
                pending.append(job)
            while True:  # everything waiting now
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._fail(pending, RuntimeError("the server is stopping"))
                    return
                pending.append(more)
            first = pending[0]
            if first.greedy and first.on_text is None:
                batch = [j for j in pending if j.greedy and j.on_text is None and j.adapter == first.adapter]
                batch = batch[: self.max_batch]
            else:
                batch = [first]
            pending = [j for j in pending if all(j is not b for b in batch)]
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                for job, result in zip(batch, self._generate(batch), strict=True):
                    job.future.set_result(result)
            except Exception as e:
                logger.exception("generation failed")
                self._fail(batch, e)

    @staticmethod
    def _fail(jobs: list[Job], e: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(e)

    def _generate(self, batch: list[Job]) -> list[tuple[list[int], str]]:
        """Token ids generated for each job (its own limit, up to end of sequence), and why it ended."""
        torch = self.torch
        tok = self.tokenizer
        width = max(len(j.input_ids) for j in batch)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.input_ids)) + j.input_ids for j in batch], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(j.input_ids)) + [1] * len(j.input_ids) for j in batch], device=self.device
        )
        first = batch[0]
        kwargs: dict[str, Any] = {"max_new_tokens": max(j.max_tokens for j in batch), "pad_token_id": pad}
        if first.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        if first.on_text is not None:  # a stream runs alone: its cancel stops only itself
            from transformers import StoppingCriteriaList

            kwargs["streamer"] = _Streamer(tok, first)
            kwargs["stopping_criteria"] = StoppingCriteriaList([_cancelled(first.cancel)])
        if first.adapter is None:
            self.model.set_active_adapters(None)
        else:
            self.model.set_active_adapters(first.adapter)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        results = []
        eos = tok.eos_token_id
        for row, job in zip(out[:, width:].tolist(), batch, strict=True):
            row = row[: job.max_tokens]
            reason = "length"
            if eos in row:
                row = row[: row.index(eos)]
                reason = "stop"
            results.append((row, reason))
        return results


def _cancelled(cancel: threading.Event) -> Any:
    """A stopping criterion: stop when the client went away."""
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return Cancelled()


class _Streamer:
    """transformers' streamer interface: text pieces as tokens arrive (held back while the text ends
    in an incomplete character)."""

    def __init__(self, tokenizer: Any, job: Job) -> None:
        self.tokenizer = tokenizer
        self.job = job
        self.prompt_seen = False
        self.ids: list[int] = []
        self.sent = ""

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate hands the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        ids = self.ids[: self.job.max_tokens]
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        if len(text) > len(self.sent) and text.startswith(self.sent) and self.job.on_text is not None:
            self.job.on_text(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass
