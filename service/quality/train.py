"""Train every checkpoint of the quality ensemble from nothing, on the CPU, reproducibly.

Order: the bases, the adapters over them, the members' candidates for training prompts, the
ranker (on pairs of those candidates), the fuser (on the ranker's top-k of those candidates), the
router (which member was right on those prompts, on the ranker's encoder). Each
step writes one subfolder of the output root and a stamp file holding a hash of its recipe, the
suite version and its inputs' stamps; a re-run skips every step whose stamp matches.

The members are narrow on purpose: each skill has one strong specialist and the others fail in ways
a small ranker can see (letters for a sum, a sorted word for a reversal, a reversed word for a sort).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from service.quality import fuser, lm, ranker, suite, vocab
from service.quality.members import (
    BaseRecipe,
    FineTuneRecipe,
    LibraryAdapterRecipe,
    load_member,
    train_adapter,
    train_base,
    train_finetune,
    train_library_adapter,
)
from service.quality.recipe import Recipe, default_recipe

logger = logging.getLogger(__name__)

# Bump when the training code changes what a recipe produces.
RECIPE_VERSION = 1
STAMP = ".quality-stamp"
# Float sums, and so the trained weights, depend on torch's thread count: training runs on this many
# threads unless told otherwise, so that a rerun on another machine reproduces the checkpoints.
THREADS = 2
# Per step, bump when its code changes what it produces (``ranker_pairs`` for pairrm, ``fuser_examples``
# or ``fuser.synthetic_examples`` for genfuser): that step and the steps after it retrain, the others not.
STEP_VERSIONS: dict[str, int] = {"pairrm": 2}
MANIFEST = "manifest.json"  # at the root: versions and every step's stamp, written when all are current
CANDIDATES = "candidates"


@dataclass
class Report:
    """Seconds and final loss of each step that ran; the names of those skipped."""

    seconds: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _Steps:
    """Runs named steps into ``root/name`` unless their stamp is current."""

    def __init__(self, root: Path, force: bool) -> None:
        self.root = root
        self.force = force
        self.stamps: dict[str, str] = {}
        self.report = Report()

    def run(self, name: str, spec: object, deps: list[str], build: Callable[[Path], float | None]) -> Path:
        out = self.root / name
        stamp = _digest(
            {
                "suite": suite.SUITE_VERSION,
                "recipe": RECIPE_VERSION,
                "spec": spec,
                "deps": [self.stamps[d] for d in deps],
                **({"step": STEP_VERSIONS[name]} if name in STEP_VERSIONS else {}),
            }
        )
        self.stamps[name] = stamp
        marker = out / STAMP
        if not self.force and marker.exists() and marker.read_text() == stamp:
            self.report.skipped.append(name)
            logger.info("%s: up to date in %s", name, out)
            return out
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        start = time.perf_counter()
        loss = build(out)
        self.report.seconds[name] = round(time.perf_counter() - start, 1)
        if loss is not None:
            self.report.loss[name] = round(loss, 4)
        marker.write_text(stamp)
        logger.info("%s: %.1fs%s", name, self.report.seconds[name], f", loss {loss:.4f}" if loss is not None else "")
        return out


def _write_candidates(out: Path, root: Path, recipe: Recipe, items: list[suite.Item]) -> None:
    answers: list[list[str]] = [[] for _ in items]
    for name, member in recipe.members.items():
        model, tok = load_member(root, name, member)
        for row, answer in zip(
            answers,
            lm.generate(
                model, tok, [it.prompt for it in items], recipe.candidates.max_new_tokens, desc=f"candidates {name}"
            ),
            strict=True,
        ):
            row.append(answer)
    with (out / "candidates.jsonl").open("w", encoding="utf-8") as f:
        for it, row in zip(items, answers, strict=True):
            f.write(
                json.dumps({"prompt": it.prompt, "reference": it.reference, "tag": it.tag, "candidates": row}) + "\n"
            )


def read_candidates(out: Path) -> tuple[list[suite.Item], list[list[str]]]:
    items, answers = [], []
    with (out / "candidates.jsonl").open(encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            items.append(suite.Item(obj["prompt"], obj["reference"], obj["tag"]))
            answers.append(list(obj["candidates"]))
    return items, answers


def shape(answer: str) -> str:
    """An answer's coarse form: a number, a capitalized word, a lowercase word, or other."""
    text = answer.strip()
    if text.isdigit():
        return "number"
    if text.isalpha():
        return "word" if text.islower() else "name" if text[:1].isupper() else "other"
    return "other"


def ranker_pairs(
    items: list[suite.Item], answers: list[list[str]], add_reference: bool, hard_weight: int = 1
) -> list[ranker.Pair]:
    """Every (better, worse) pair of distinct candidates of each prompt by ``suite.credit`` (right
    against wrong; for a compound prompt also half right against wholly wrong); with
    ``add_reference``, the reference stands in as the right one where no member answered right. A
    pair whose two answers have the same ``shape`` (a sorted word against the reversed one) appears
    ``hard_weight`` times: the easy pairs (a number against a word) otherwise dominate the loss, and
    whether the ranker learns the hard ones at all was measured to depend on the seed (first-choice
    accuracy 66-91% over three seeds at weight 1, 88-92% at weight 4). Compound prompts' pairs count
    once (every compound answer has the same shape): weighted too, they were 37% of the pairs and the
    ranker's first choice fell from 97% to 87% on held-out reversals (bench.fusion's data)."""
    pairs: list[ranker.Pair] = []
    for it, row in zip(items, answers, strict=True):
        unique = list(dict.fromkeys(row))
        credit = {c: suite.credit(c, it) for c in unique}
        if add_reference and not any(v == 1.0 for v in credit.values()):
            credit = {it.reference: 1.0} | credit
        for better, b in credit.items():
            for worse, w in credit.items():
                if b > w:
                    hard = it.tag != suite.COMPOUND and shape(better) == shape(worse)
                    pairs.extend([ranker.Pair(it.prompt, better, worse)] * (hard_weight if hard else 1))
    return pairs


def fuser_examples(
    items: list[suite.Item], answers: list[list[str]], scores: list[list[float]]
) -> list[fuser.FuserExample]:
    """The ranker's top-k of each prompt with the reference as target. Prompts whose top-k does not
    hold the right answer (for a compound prompt: each of its parts, in some candidate) are left out
    (the fuser is taught to choose and copy, not to solve the task), unless no prompt has one
    (undertrained members in the small mode)."""
    examples = [
        fuser.FuserExample("", it.prompt, tuple(row[k] for k in ranker.order(score)[: fuser.TOP_K]), it.reference)
        for it, row, score in zip(items, answers, scores, strict=True)
    ]
    kept = [ex for ex, it in zip(examples, items, strict=True) if suite.covered(ex.candidates, it)]
    return kept or examples


def _write_manifest(root: Path, small: bool, steps: _Steps) -> None:
    """Versions, each step's stamp and the seconds of the run that built it (kept from the last
    manifest for steps this run skipped)."""
    path = root / MANIFEST
    try:
        before = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        before = {}
    seconds = {n: before.get("seconds", {}).get(n) for n in steps.report.skipped} | steps.report.seconds
    manifest = {
        "suite": suite.SUITE_VERSION,
        "recipe": RECIPE_VERSION,
        "small": small,
        "stamps": steps.stamps,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(root: Path) -> dict[str, object] | None:
    """The manifest ``train_all`` wrote under ``root`` (None if it never finished there)."""
    path = root / MANIFEST
    if not path.exists():
        return None
    data: dict[str, object] = json.loads(path.read_text())
    return data


def train_all(
    root: Path, recipe: Recipe | None = None, small: bool = False, force: bool = False, threads: int = THREADS
) -> Report:
    """Train (or keep, where stamps match) every checkpoint of ``recipe`` under ``root``, on
    ``threads`` torch threads (the caller's setting is restored afterwards).

    ``small``: a few steps of everything (the CI's test tier).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_all(root, recipe or default_recipe(), small, force)
    finally:
        torch.set_num_threads(before)


def _train_all(root: Path, recipe: Recipe, small: bool, force: bool) -> Report:
    if small:
        recipe = recipe.scaled(0.03)
    root.mkdir(parents=True, exist_ok=True)
    exclude = frozenset(it.prompt for it in suite.eval_suite(recipe.eval_seed, recipe.eval_per_skill, suite.ALL_SKILLS))
    steps = _Steps(root, force)
    spec_exclude = {"eval_seed": recipe.eval_seed, "eval_per_skill": recipe.eval_per_skill}

    for name, member in recipe.members.items():
        spec = {"member": asdict(member), **spec_exclude}
        if isinstance(member, BaseRecipe):
            steps.run(name, spec, [], functools.partial(train_base, member, exclude=exclude, desc=name))
        else:
            build = functools.partial(train_adapter, member, root / member.base, exclude=exclude, desc=name)
            steps.run(name, spec, [member.base], build)
    members = list(recipe.members)
    items = suite.training_items(recipe.candidates.seed, recipe.candidates.per_skill, suite.ALL_SKILLS, exclude)
    cands = steps.run(
        CANDIDATES,
        {"candidates": asdict(recipe.candidates), "skills": suite.ALL_SKILLS, **spec_exclude},
        members,
        lambda out: _write_candidates(out, root, recipe, items),
    )
    words = vocab.suite_words()

    def build_ranker(out: Path) -> float:
        model, tok = ranker.build(words, recipe.ranker)
        loss = ranker.train(
            model,
            tok,
            ranker_pairs(*read_candidates(cands), recipe.ranker.add_reference, recipe.ranker.hard_weight),
            recipe.ranker,
        )
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        return loss

    ranker_dir = steps.run("pairrm", {"ranker": asdict(recipe.ranker)}, [CANDIDATES], build_ranker)

    def build_fuser(out: Path) -> float:
        cand_items, answers = read_candidates(cands)
        rmodel, rtok = ranker.load(ranker_dir)
        scores = ranker.scores(rmodel, rtok, [it.prompt for it in cand_items], answers)
        model, tok = fuser.build(words, recipe.fuser)
        fresh = fuser.synthetic_examples(recipe.fuser.seed, exclude=exclude)
        examples = fuser_examples(cand_items, answers, scores)
        loss = fuser.train(model, tok, examples, recipe.fuser, synthetic=fresh, share=recipe.fuser.synthetic)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        return loss

    steps.run("genfuser", {"fuser": asdict(recipe.fuser)}, [CANDIDATES, "pairrm"], build_fuser)

    def build_router(out: Path) -> None:
        from service.quality.train_router import examples_from_candidates, train

        cand_items, answers = read_candidates(cands)
        examples = examples_from_candidates(members, cand_items, answers)
        if len(examples) < 2:  # the small recipe's members may get nothing right: a router that knows nothing
            examples = examples_from_candidates(members, cand_items, answers, keep_unanswered=True)
        train(examples, str(ranker_dir), out, kind="auto")

    steps.run("router", {"router": {"kind": "auto", "k": 16, "heldout": 0.2}}, [CANDIDATES, "pairrm"], build_router)
    # The variants last: the default ensemble (members, ranker, fuser, router) does not wait for them.
    for name, variant in recipe.variants.items():
        spec = {"member": asdict(variant), **spec_exclude}
        if isinstance(variant, FineTuneRecipe):
            build = functools.partial(train_finetune, variant, root / variant.base, exclude=exclude, desc=name)
        elif isinstance(variant, LibraryAdapterRecipe):
            build = functools.partial(train_library_adapter, variant, root / variant.base, exclude=exclude, desc=name)
        else:
            build = functools.partial(train_adapter, variant, root / variant.base, exclude=exclude, desc=name)
        steps.run(name, spec, [variant.base], build)
    _write_manifest(root, small, steps)
    return steps.report
