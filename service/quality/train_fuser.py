"""``ensemble-gateway train-fuser``: fine-tune any GenFuser checkpoint (the published
``llm-blender/gen_fuser_3b``, or ours) and write a checkpoint the gateway serves unchanged.

Data: JSONL, ``{"instruction", "input", "candidates": [...], "target"}`` per line (candidates in
the ranker's order, best first; ``instruction`` may be empty), or the store's answers that feedback
gave a ``reference`` (``--from-store``): their instruction and input, their candidates in the order
the ranker put them (the top ``--top-k``), the reference as the target. The examples of a held-out
share of the inputs are kept aside; exact match (after the suite's normalization) and chrF of the
fused texts on them, decoded as ``Blender.fuse`` decodes, are measured before and after.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from service.quality import fuser, lm
from service.quality.lm import FineTune
from service.quality.suite import normalize


def _example(obj: Any) -> fuser.FuserExample:
    if not isinstance(obj, dict):
        raise ValueError("need a JSON object")
    instruction, given, target = obj.get("instruction", ""), obj.get("input"), obj.get("target")
    cands = obj.get("candidates")
    if not isinstance(given, str) or not isinstance(target, str) or not isinstance(instruction, str):
        raise ValueError("`input` and `target` must be strings (and `instruction`, when given)")
    if not (isinstance(cands, list) and cands and all(isinstance(c, str) for c in cands)):
        raise ValueError("`candidates` must be a non-empty list of strings")
    return fuser.FuserExample(instruction, given, tuple(cands), target)


def read_examples(path: Path) -> tuple[list[fuser.FuserExample], list[tuple[int, str]]]:
    """The examples of every good line, and (line number, why) for each bad one."""
    return lm.read_jsonl(path, lambda obj: [_example(obj)])


def store_examples(
    answered: Iterable[tuple[dict[str, Any], list[dict[str, Any]]]], top_k: int
) -> list[fuser.FuserExample]:
    """One example per stored answer whose feedback gave a reference (the last one given): its
    candidates as the ranker ordered them (rank 1 first; member order when unranked), the top ``top_k``."""
    out = []
    for row, notes in answered:
        references = [n["reference"] for n in notes if n.get("reference")]
        if row["inputs_hashed"] or not references or not row["candidates"]:
            continue
        ranked = sorted(row["candidates"], key=lambda c: c["rank"] if c.get("rank") is not None else 1_000_000)
        given = row["input"]
        out.append(
            fuser.FuserExample(
                str(given["instruction"]),
                str(given["input_text"]),
                tuple(str(c["text"]) for c in ranked[:top_k]),
                str(references[-1]),
            )
        )
    return out


def split(
    examples: Sequence[fuser.FuserExample], heldout: float, seed: int
) -> tuple[list[fuser.FuserExample], list[fuser.FuserExample]]:
    """(train, held out), by input: no input has examples on both sides."""
    return lm.split_by(examples, lambda e: e.instruction + "\n" + e.input_text, heldout, seed)


def scores(model: Any, tok: Any, examples: Sequence[fuser.FuserExample]) -> dict[str, float] | None:
    """Exact match (%, after normalization) and corpus chrF of the fused texts against the targets."""
    if not examples:
        return None
    import sacrebleu

    fused = fuser.fuse(model, tok, examples)
    targets = [e.target for e in examples]
    exact = sum(normalize(f) == normalize(t) for f, t in zip(fused, targets, strict=True))
    return {
        "exact_match": 100.0 * exact / len(examples),
        "chrf": float(sacrebleu.corpus_chrf(fused, [targets]).score),
    }


def fine_tune(
    checkpoint: Path, examples: Sequence[fuser.FuserExample], out: Path, fit: FineTune, heldout: float = 0.1
) -> dict[str, Any]:
    """Train ``checkpoint`` on ``examples`` (a share of their inputs held out), save it to ``out``."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if not examples:
        raise ValueError("no usable example")
    train, test = split(examples, heldout, fit.seed)
    if not train:
        raise ValueError(f"every one of the {len(examples)} examples is held out: lower --heldout")
    # llm-blender loads a fuser with AutoModelForSeq2SeqLM: any seq2seq checkpoint (T5, BART, ...).
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model.eval()
    before = scores(model, tok, test)
    loss = fuser.train(model, tok, train, fit, desc="train-fuser")
    after = scores(model, tok, test)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "examples": {"train": len(train), "heldout": len(test)},
        "heldout": {"before": before, "after": after},
        "final_loss": loss,
    }
