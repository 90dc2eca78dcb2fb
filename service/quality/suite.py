"""A deterministic task suite: short prompts with one right answer each, grouped by skill.

Every item is a pure function of ``(seed, skill, index)``, so a suite is reproducible from its seed
alone. Seeds below ``EVAL_SEED_BASE`` are training seeds, seeds from it on are evaluation seeds;
training streams also drop every prompt of the evaluation suite they are given (``exclude``). The
``capital`` skill is closed-book recall of an invented table (``CAPITALS``): its prompts cannot be
held out (a fact never seen cannot be known), so it is exempt from that dedup.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from service.pipeline.voting import normalize_answer

# Bump when an item's prompt or reference changes for a given (seed, skill, index).
SUITE_VERSION = 1

EVAL_SEED_BASE = 1_000_000
DEFAULT_EVAL_SEED = EVAL_SEED_BASE + 1

SKILLS: tuple[str, ...] = ("add", "reverse", "sort", "capital")
FACT_SKILLS: frozenset[str] = frozenset({"capital"})

# Invented countries and their capitals (every city <= 8 characters).
CAPITALS: dict[str, str] = {
    "Zorvania": "Kelmar",
    "Quentara": "Olvik",
    "Brellund": "Tavo",
    "Morwenia": "Pelisk",
    "Yarkosh": "Umbrin",
    "Felgaria": "Sorn",
    "Dravonne": "Kilvo",
    "Ostrelia": "Marun",
    "Vintoria": "Ebrel",
    "Lumaria": "Tosk",
    "Hesperon": "Gildra",
    "Caldoria": "Rivo",
    "Nerevia": "Samok",
    "Tirsland": "Ovel",
    "Pandoria": "Lemka",
    "Ulvania": "Drost",
    "Kastovia": "Belun",
    "Sarnavik": "Mirel",
    "Quillon": "Fesk",
    "Gorvania": "Tulan",
    "Eldoria": "Varn",
    "Marvelle": "Kosta",
    "Ithrenia": "Palvo",
    "Borgundy": "Nesh",
    "Alvecca": "Torim",
    "Wendavia": "Ruska",
    "Jorvala": "Emsik",
    "Pelloria": "Gart",
    "Trovenia": "Lisk",
    "Xandoria": "Bemo",
    "Sylvessa": "Orla",
    "Rondavia": "Kipel",
    "Femoria": "Zadok",
    "Velmaro": "Urik",
    "Cassadon": "Peltra",
    "Norrvik": "Amsel",
    "Oberlind": "Tavik",
    "Harrowen": "Mesk",
    "Drusonia": "Falk",
    "Gelvania": "Noro",
    "Ambrezia": "Kolt",
    "Listrania": "Vemba",
    "Torvald": "Hesk",
    "Mirendia": "Solva",
    "Brakkon": "Ulma",
    "Estravia": "Pindo",
    "Kelvaria": "Dorsk",
    "Yslandra": "Temo",
}
COUNTRIES: tuple[str, ...] = tuple(CAPITALS)

# The skills that transform the prompt's word, and how.
WORD_SKILLS: dict[str, Callable[[str], str]] = {
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
}


@dataclass(frozen=True)
class Item:
    """One task: the prompt a member receives, the reference answer and the skill's tag."""

    prompt: str
    reference: str
    tag: str


def normalize(text: str) -> str:
    """The form answers are compared in (the gateway's vote compares in the same form)."""
    return normalize_answer(text)


def is_correct(answer: str, item: Item) -> bool:
    """Exact match after ``normalize``."""
    return normalize(answer) == normalize(item.reference)


def subject(prompt: str) -> str:
    """The last word of a prompt without its punctuation: the word to reverse or sort, the country."""
    return prompt.rsplit(" ", 1)[-1].rstrip(".?")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def make_item(seed: int, skill: str, index: int) -> Item:
    """The ``index``-th item of ``skill``'s stream for ``seed`` (a pure function of the three)."""
    rng = random.Random(f"{seed}:{skill}:{index}")
    if skill == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return Item(f"What is {a} plus {b}?", str(a + b), skill)
    if skill == "reverse":
        w = _word(rng)
        return Item(f"Reverse the word {w}.", WORD_SKILLS[skill](w), skill)
    if skill == "sort":
        w = _word(rng)
        return Item(f"Sort the letters {w}.", WORD_SKILLS[skill](w), skill)
    if skill == "capital":
        country = rng.choice(COUNTRIES)
        return Item(f"What is the capital of {country}?", CAPITALS[country], skill)
    raise ValueError(f"unknown skill {skill!r}")


def stream(seed: int, skill: str, exclude: Collection[str] = (), unique: bool = True) -> Iterator[Item]:
    """``skill``'s items for ``seed`` in order, skipping excluded prompts and (if ``unique``) repeats.

    Fact skills are never deduplicated: their prompt space is the table itself.
    """
    fact = skill in FACT_SKILLS
    seen: set[str] = set()
    index = 0
    while True:
        item = make_item(seed, skill, index)
        index += 1
        if fact or (item.prompt not in exclude and not (unique and item.prompt in seen)):
            seen.add(item.prompt)
            yield item


def generate(
    seed: int, per_skill: int, skills: Sequence[str] = SKILLS, exclude: Collection[str] = (), unique: bool = True
) -> list[Item]:
    """``per_skill`` items of each skill, interleaved round-robin (skill order as given)."""
    streams = [stream(seed, skill, exclude, unique) for skill in skills]
    return [next(s) for _ in range(per_skill) for s in streams]


def eval_suite(seed: int = DEFAULT_EVAL_SEED, per_skill: int = 100, skills: Sequence[str] = SKILLS) -> list[Item]:
    """A held-out suite; ``seed`` must be an evaluation seed (>= ``EVAL_SEED_BASE``)."""
    if seed < EVAL_SEED_BASE:
        raise ValueError(f"evaluation seeds start at {EVAL_SEED_BASE}, got {seed}")
    return generate(seed, per_skill, skills)


def training_items(
    seed: int, per_skill: int, skills: Sequence[str] = SKILLS, exclude: Collection[str] = ()
) -> list[Item]:
    """Training items; ``seed`` must be a training seed and ``exclude`` holds the held-out prompts.

    Repeats are kept (a stream may propose a prompt twice), excluded prompts are not.
    """
    if not 0 <= seed < EVAL_SEED_BASE:
        raise ValueError(f"training seeds lie in [0, {EVAL_SEED_BASE}), got {seed}")
    return generate(seed, per_skill, skills, exclude, unique=False)


def write_jsonl(path: Path, items: Sequence[Item]) -> None:
    """One JSON object per line: ``prompt``, ``reference``, ``tag``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
