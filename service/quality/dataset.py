"""An eval dataset: JSONL with ``prompt`` (or ``messages``), ``reference`` and an optional ``tag``.

A line that is not such an object is reported with its number and skipped, never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class EvalItem:
    """One prompt with its reference; ``line`` is its line number in the file (1-based)."""

    line: int
    reference: str
    tag: str = "all"
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def request(self) -> dict[str, Any]:
        """The prompt part of a /generate body."""
        if self.prompt is not None:
            return {"prompt": self.prompt}
        return {"messages": [{"role": r, "content": c} for r, c in self.messages or ()]}

    @property
    def source(self) -> str:
        """The text a ranker sees for this item (as the gateway builds it)."""
        if self.prompt is not None:
            return self.prompt
        turns = self.messages or ()
        if len(turns) == 1 and turns[0][0] == "user":
            return turns[0][1]
        return "\n".join(f"{r}: {c}" for r, c in turns)


@dataclass
class Dataset:
    items: list[EvalItem] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)


def _item(line: int, obj: Any) -> EvalItem:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    reference = obj.get("reference")
    if not isinstance(reference, str):
        raise ValueError("`reference` must be a string")
    tag = obj.get("tag", "all")
    if not isinstance(tag, str) or not tag:
        raise ValueError("`tag` must be a non-empty string")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of `prompt` or `messages`")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("`prompt` must be a non-empty string")
        return EvalItem(line, reference, tag, prompt=prompt)
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list")
    turns = []
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError("each message needs a `role` (system, user, assistant) and a string `content`")
        turns.append((str(m["role"]), str(m["content"])))
    return EvalItem(line, reference, tag, messages=tuple(turns))


def read_dataset(path: Path) -> Dataset:
    """Every good line as an ``EvalItem``; the others in ``bad_lines`` with the reason."""
    data = Dataset()
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                data.items.append(_item(number, json.loads(text)))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                data.bad_lines.append((number, str(e).split("\n")[0]))
    return data
