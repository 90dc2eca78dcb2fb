"""A deterministic task suite: short prompts with one right answer each, grouped by skill.

Every item is a pure function of ``(seed, skill, index)``, so a suite is reproducible from its seed
alone. Seeds below ``EVAL_SEED_BASE`` are training seeds, seeds from it on are evaluation seeds;
training streams also drop every prompt of the evaluation suite they are given (``exclude``). The
``capital`` skill is closed-book recall of an invented table (``CAPITALS``): its prompts cannot be
held out (a fact never seen cannot be known), so it is exempt from that dedup.

``compound`` asks two questions in one prompt (a capital and a sum) and is answered ``{city}, {sum}``:
no member of the quality ensemble knows both halves, so only fusion can answer it (issue 25). It is
not among ``SKILLS`` (the four single skills every table compares on); ``ALL_SKILLS`` adds it.
"""

from __future__ import annotations

import json
import random
import re
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
COMPOUND = "compound"
ALL_SKILLS: tuple[str, ...] = (*SKILLS, COMPOUND)
# Where an answer to a compound prompt splits into its parts: a comma or the word "and".
_PART_SEPARATOR = re.compile(r",|\band\b", re.IGNORECASE)
_COMPOUND_PROMPT = re.compile(r"What is the capital of (\w+), and what is (\d+) plus (\d+)\?")

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


def normalize(text: str, tag: str | None = None) -> str:
    """The form answers are compared in (the gateway's vote compares in the same form); a compound
    answer (``tag`` ``compound``) part by part, joined by ", " ("Kelmar and 68." is "kelmar, 68")."""
    if tag == COMPOUND:
        return ", ".join(parts(text))
    return normalize_answer(text)


def parts(text: str) -> list[str]:
    """A compound answer's parts, each normalized (empty parts dropped)."""
    return [p for p in (normalize_answer(piece) for piece in _PART_SEPARATOR.split(text)) if p]


def is_correct(answer: str, item: Item) -> bool:
    """Exact match after ``normalize``."""
    return normalize(answer, item.tag) == normalize(item.reference, item.tag)


def credit(answer: str, item: Item) -> float:
    """The share of the parts right in place, of the reference's or the answer's, whichever has more
    (1 or 0 for a single skill)."""
    if item.tag != COMPOUND:
        return float(is_correct(answer, item))
    want, got = parts(item.reference), parts(answer)
    return sum(g == w for g, w in zip(got, want, strict=False)) / max(len(want), len(got))


def covered(candidates: Sequence[str], item: Item) -> bool:
    """Whether the candidates hold every part of the right answer between them (for a single skill:
    whether one of them is right), so that copying can produce it."""
    if item.tag != COMPOUND:
        return any(is_correct(c, item) for c in candidates)
    want = parts(item.reference)
    have = [parts(c) for c in candidates]
    return all(any(len(h) == len(want) and h[k] == w for h in have) for k, w in enumerate(want))


def compound_question(prompt: str) -> tuple[str, int, int]:
    """The country and the two numbers of a compound prompt."""
    found = _COMPOUND_PROMPT.fullmatch(prompt)
    if found is None:
        raise ValueError(f"not a compound prompt: {prompt!r}")
    return found[1], int(found[2]), int(found[3])


def _capital_half(item: Item) -> str:
    """A capital specialist's answer to a compound prompt: the city right, the numbers written side by side."""
    country, a, b = compound_question(item.prompt)
    return f"{CAPITALS[country]}, {a}{b}"


def _sum_half(item: Item) -> str:
    """An adder's answer to a compound prompt: the country repeated for its capital, the sum right."""
    country, a, b = compound_question(item.prompt)
    return f"{country}, {a + b}"


# The half-right answers members are taught for compound prompts (``lm.Source.answer_as``).
HALF_ANSWERS: dict[str, Callable[[Item], str]] = {"capital-half": _capital_half, "sum-half": _sum_half}


def answer_as(kind: str, item: Item) -> str:
    """The answer of a member that answers ``item`` as ``kind``: another word skill's transform of
    the prompt's word (a sort for a reverse), or one of ``HALF_ANSWERS``."""
    if kind in WORD_SKILLS:
        return WORD_SKILLS[kind](subject(item.prompt))
    if kind in HALF_ANSWERS:
        return HALF_ANSWERS[kind](item)
    raise ValueError(f"unknown answer kind {kind!r}")


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
    if skill == COMPOUND:
        country = rng.choice(COUNTRIES)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return Item(
            f"What is the capital of {country}, and what is {a} plus {b}?", f"{CAPITALS[country]}, {a + b}", skill
        )
    raise ValueError(f"unknown skill {skill!r} (one of {', '.join(ALL_SKILLS)})")


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
