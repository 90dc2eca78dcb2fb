"""What the store keeps, as plain rows: an answer with its evidence (``AnswerRecord``) and a
piece of feedback on one (``FeedbackRecord``). The pipeline's record stage fills the first."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hashed_input(value: dict[str, Any]) -> dict[str, Any]:
    """The input with every text replaced by its SHA-256 (``store.record_inputs: false``)."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, str):
            out[k] = {"sha256": digest(v)}
        elif isinstance(v, list):
            out[k] = [{**m, "content": {"sha256": digest(m["content"])}} for m in v]
        else:
            out[k] = v
    return out


def config_digest(dumped: dict[str, Any]) -> str:
    """A short digest of a configuration (its JSON dump): which configuration served an answer."""
    return digest(json.dumps(dumped, sort_keys=True, default=str))[:16]


@dataclass(frozen=True)
class AnswerRecord:
    id: str
    created_at: float
    api: str
    ensemble: str
    config_digest: str
    key_id: str | None
    metadata: dict[str, str] | None
    inputs_hashed: bool
    input: dict[str, Any]  # prompt | messages, instruction, input_text (what ranker and fuser saw)
    output: str
    fused: bool
    fusion: dict[str, Any]
    candidates: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    degraded_reasons: list[str]
    timings_ms: dict[str, float]
    usage: dict[str, Any]
    finish_reason: str
    request: dict[str, Any] | None = None
    retrievable: bool = True
    not_called: list[dict[str, str]] | None = None  # members routing left out: {member, reason}

    def row(self) -> dict[str, Any]:
        """The record as the table's row (shallow: a record is built fresh for each answer)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FeedbackRecord:
    id: str
    answer_id: str
    created_at: float
    key_id: str | None
    preferred: str | None = None
    rejected: list[str] = field(default_factory=list)
    reference: str | None = None
    rating: float | None = None
    comment: str | None = None

    def row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
