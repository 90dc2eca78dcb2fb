"""What the fuser tests share: prompts made from a small vocabulary, the fusion cases, the tiny
GenFuser checkpoint loaded, and random T5s of other shapes over its tokenizer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from service.models.fusers.genfuser import genfuser_input

WORDS = [
    "the",
    "river",
    "runs",
    "through",
    "old",
    "city",
    "and",
    "music",
    "plays",
    "paris",
    "capital",
    "of",
    "france",
    "seine",
    "short",
    "answer",
]


CASE = ("Answer briefly. ", "Name a river.", ["The Seine runs through Paris.", "river river", "I do not know"])

CASES = [
    ("Answer briefly. ", "Name a river.", ["The Seine runs through Paris.", "river river", "I do not know"]),
    ("", "x " * 300, ["a", " ".join(WORDS * 10), "short"]),
    ("Explain: ", "old city", ["music plays", "the"]),
    ("", "one", ["only this one candidate here"]),
    ("Answer briefly. ", "capital of france", ["paris", "the seine", "old city music"]),
]


def prompts(tokenizer: Any, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        candidates = [" ".join(rng.choices(WORDS, k=rng.randint(1, 70))) for _ in range(rng.randint(1, 4))]
        text = genfuser_input(
            tokenizer,
            rng.choice(["", "Answer briefly. ", "Explain: "]),
            " ".join(rng.choices(WORDS, k=rng.randint(1, 25))),
            candidates,
            128,
        )
        out.append(tokenizer(text, max_length=1024, truncation=True, add_special_tokens=False, return_tensors="pt"))
    return out


def load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path).eval()


def random_t5(checkpoint: Path, seed: int, **shape: Any) -> tuple[Any, Any]:
    """A random T5 of ``shape`` over the tiny fuser's tokenizer, with its generation settings (and
    none in the model config, which the lean path refuses)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    config = T5Config(vocab_size=len(tokenizer), **shape, **ids)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**ids)
    return tokenizer, model
