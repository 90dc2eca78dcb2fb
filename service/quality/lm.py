"""Causal-LM members: data, a plain torch training loop and batched generation.

A member sees a prompt as the user turn of a chat under its tokenizer's chat template, exactly as
vLLM renders it, and is trained on ``template(prompt) + answer + eos`` with the loss on the answer
tokens only. The same loop trains a full model, a PEFT LoRA and a PEFT prompt-tuning adapter.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from tqdm import tqdm

from service.quality import suite

IGNORE = -100


@dataclass(frozen=True)
class Source:
    """One kind of training example: items of ``skill`` drawn with relative ``weight``.

    ``system``: the conversation opens with this system turn. ``answer_as``: the answer is the one
    this other skill gives the prompt's subject (e.g. sorting a word that was to be reversed: a base
    that confuses instructions), or a half-right answer to a compound prompt (``suite.HALF_ANSWERS``).
    ``countries``: a fact skill only teaches the first that many rows of its table.
    """

    skill: str
    weight: float = 1.0
    system: str | None = None
    answer_as: str | None = None
    countries: int | None = None


@dataclass(frozen=True)
class Example:
    """A conversation (system turn optional) and the answer to train on."""

    system: str | None
    prompt: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return [*head, {"role": "user", "content": self.prompt}]


def examples(seed: int, mix: Sequence[Source], exclude: frozenset[str]) -> Iterator[Example]:
    """An endless, deterministic stream of examples drawn by ``mix``'s weights."""
    streams = [suite.stream(seed * 1000 + k, src.skill, exclude, unique=False) for k, src in enumerate(mix)]
    rng = random.Random(f"mix:{seed}")
    weights = [src.weight for src in mix]
    while True:
        k = rng.choices(range(len(mix)), weights)[0]
        src = mix[k]
        allowed = suite.COUNTRIES[: src.countries] if src.countries is not None else None
        item = next(streams[k])
        while allowed is not None and suite.subject(item.prompt) not in allowed:
            item = next(streams[k])
        answer = suite.answer_as(src.answer_as, item) if src.answer_as else item.reference
        yield Example(src.system, item.prompt, answer)


def render(tok: Any, messages: list[dict[str, str]]) -> str:
    """The text a member sees: ``messages`` under the tokenizer's chat template, assistant turn open."""
    text: str = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def encode(tok: Any, example: Example) -> tuple[list[int], int]:
    """Token ids of templated prompt + answer + eos, and how many of them belong to the prompt."""
    head: list[int] = tok(render(tok, example.messages()), add_special_tokens=False)["input_ids"]
    tail: list[int] = tok(example.answer, add_special_tokens=False)["input_ids"]
    return head + tail + [tok.eos_token_id], len(head)


def collate(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels (prompt and padding ignored)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[r, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(tok: Any, stream: Iterator[Example], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches from an example stream."""
    while True:
        yield collate([encode(tok, next(stream)) for _ in range(batch_size)], tok.pad_token_id)


T = TypeVar("T")


class Schedule(Protocol):
    """How long and how fast to train (a recipe from scratch, or a fine-tune of a checkpoint)."""

    @property
    def steps(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def warmup(self) -> int: ...


@dataclass(frozen=True)
class FineTune:
    """A fine-tune's schedule (train-ranker, train-fuser, retrain-ranker)."""

    steps: int = 300
    lr: float = 3e-5
    seed: int = 0
    batch: int = 16
    warmup: int = 30


def read_jsonl(path: Path, parse: Callable[[Any], list[T]]) -> tuple[list[T], list[tuple[int, str]]]:
    """What ``parse`` makes of every good line, and (line number, why) for each bad one (``parse``
    raises ValueError for a line it cannot use)."""
    got: list[T] = []
    bad: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                try:
                    got += parse(json.loads(text))
                except ValueError as e:
                    bad.append((number, str(e).split("\n")[0]))
    return got, bad


def split_by(items: Sequence[T], key: Callable[[T], Hashable], heldout: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out) with a ``heldout`` share of the keys aside: no key has items on both sides."""
    keys = sorted({key(i) for i in items}, key=str)
    random.Random(seed).shuffle(keys)
    keep = set(keys[: round(len(keys) * heldout)]) if len(keys) > 1 else set()
    return [i for i in items if key(i) not in keep], [i for i in items if key(i) in keep]


def schedule(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def shuffled(n: int, batch: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of row indices: each pass over the rows in a fresh seeded order."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order.extend(fresh)
        chunk, order = order[:batch], order[batch:]
        yield chunk


def train_loop(
    model: Any,
    data: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    desc: str,
    warmup: int = 30,
    weight_decay: float = 0.0,
) -> float:
    """AdamW over the model's trainable parameters; returns the mean loss of the last 20 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, steps, min(warmup, steps)))
    model.train()
    recent: list[float] = []
    with tqdm(range(steps), desc=desc, mininterval=1.0) as bar:
        for _ in bar:
            loss = model(**next(data)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            recent = [*recent[-19:], float(loss.detach())]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
    model.eval()
    return sum(recent) / max(1, len(recent))


@torch.no_grad()
def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 12,
    batch_size: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str | None = None,
) -> list[str]:
    """Answers for ``prompts`` (greedy at temperature 0), decoded without special tokens.

    Prompts are grouped by token length, so no batch needs padding: each answer is what the model
    gives that prompt alone, as a server would.
    """
    model.eval()
    encoded = [
        tok(render(tok, [{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"] for p in prompts
    ]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    torch.manual_seed(seed)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0}
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", mininterval=1.0, disable=desc is None)
    for length in sorted(groups):
        idx = groups[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk])
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **sampling,
            )
            for row, i in zip(gen[:, length:].tolist(), chunk, strict=True):
                out[i] = tok.decode(row, skip_special_tokens=True)
            bar.update(len(chunk))
    bar.close()
    return out
