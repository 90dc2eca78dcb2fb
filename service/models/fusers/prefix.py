"""Streaming a beam search's text: the part of it that is final at each step."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class FinalPrefix:
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
            prefix = common_prefix(seqs + self.ended)[1:]  # drop the decoder start token
            text = self.tokenizer.decode(prefix, skip_special_tokens=True).rstrip("\ufffd")
            if len(text) > len(self.sent) and text.startswith(self.sent):
                self.on_text(text[len(self.sent) :])
                self.sent = text
        return stop


def common_prefix(seqs: list[list[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return first[:i]
    return first[:n]
