"""PairRM's input: the source and each candidate tokenized as the PairRM-hf model card does, behind
the marker tokens the model locates by id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.config import RankerConfig

SOURCE_PREFIX = "<|source|>"
CAND1_PREFIX = "<|candidate1|>"
CAND2_PREFIX = "<|candidate2|>"


def strip_markers(text: str) -> str:
    """PairRM locates its three marker tokens by id: a text that contains one would break it."""
    for marker in (SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, "<|candidate|>"):
        text = text.replace(marker, "")
    return text


@dataclass
class PairTexts:
    """A request's texts, tokenized once: the source and each unique candidate in both roles."""

    source: list[int]
    cand1: list[list[int]]
    cand2: list[list[int]]


def encode_texts(tok: Any, cfg: RankerConfig, source: str, unique: list[str]) -> PairTexts:
    """Tokenized as the PairRM-hf model card does, each text once: a candidate's ids depend
    only on its prefix and the length budget the source leaves, so every pair reuses them."""
    source_ids = tok.encode(SOURCE_PREFIX + strip_markers(source), max_length=cfg.source_max_length, truncation=True)
    budget = (cfg.source_max_length + 2 * cfg.candidate_max_length - len(source_ids)) // 2
    texts = [strip_markers(c) for c in unique]
    c1 = [tok.encode(CAND1_PREFIX + c, max_length=budget, truncation=True) for c in texts]
    c2 = [tok.encode(CAND2_PREFIX + c, max_length=budget, truncation=True) for c in texts]
    return PairTexts(source_ids, c1, c2)
