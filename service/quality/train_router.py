"""``ensemble-gateway train-router``: a router (``service.models.routers.encoder``) from answers the
ensemble gave, as the store keeps them (or its JSONL export, or an eval's records).

Each answer is an example: its source (instruction + input) and, for each member that answered, a
label. Where the answer has feedback, a member is right (1) when its candidate is one the feedback
says is right (preferred, matching the reference, rated well) and wrong (0) otherwise; without
feedback, when its candidate says what the ensemble's first choice said. Members not called are
unknown (routed answers teach about the members they called only). Samples of a member count as
the member (right when any sample is).

Both models are fitted on the same split (``heldout`` of the sources, by a hash of the text) and
measured by the held-out **top-1 accuracy**: how often the member the router ranks first among
those that answered was right. ``kind="auto"`` keeps the better (kNN on a tie: nothing to train),
then refits it on every example.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.models.routers.encoder import Embedder, RouterModel
from service.quality.learn import CHRF_THRESHOLD, judged, source_of
from service.quality.suite import is_correct, normalize

logger = logging.getLogger(__name__)

KINDS = ("knn", "linear")


@dataclass(frozen=True)
class Example:
    source: str
    labels: dict[str, float]  # member -> 1 right / chosen, 0 not; members not called are absent


def member_of(key: str) -> str:
    """A candidate's member: ``name#i`` (a sample) is ``name``."""
    return key.split("#", 1)[0]


def example_of(row: dict[str, Any], notes: Sequence[dict[str, Any]], chrf_threshold: float) -> Example | None:
    """One stored answer as an example; None when it cannot teach (inputs hashed, no candidate, or
    feedback that names nothing right)."""
    if row.get("inputs_hashed") or not row.get("candidates"):
        return None
    cands = sorted(row["candidates"], key=lambda c: int(c.get("rank") or 0))
    if notes:
        _, right = judged(row, notes, chrf_threshold)
        if not right:
            return None
        good = {normalize(t) for t in right}
    else:
        good = {normalize(str(cands[0]["text"]))}
    labels: dict[str, float] = {}
    for c in cands:
        member = member_of(str(c["member"]))
        labels[member] = max(labels.get(member, 0.0), 1.0 if normalize(str(c["text"])) in good else 0.0)
    return Example(source_of(row), labels)


def examples_of(
    answered: Iterable[tuple[dict[str, Any], Sequence[dict[str, Any]]]],
    chrf_threshold: float = CHRF_THRESHOLD,
    feedback_only: bool = False,
) -> list[Example]:
    out = []
    for row, notes in answered:
        if feedback_only and not notes:
            continue
        ex = example_of(row, notes, chrf_threshold)
        if ex is not None:
            out.append(ex)
    return out


def read_records(path: Path) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``export``'s records.jsonl (or an eval's ``--records-out``): each answer with its feedback."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append((row, list(row.get("feedback") or [])))
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: not a record: {e}") from e
    return out


def _is_heldout(source: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "big") / 2**32
    return h < share


def label_matrix(examples: Sequence[Example], members: list[str]) -> np.ndarray:
    y = np.full((len(examples), len(members)), np.nan, dtype=np.float32)
    col = {m: j for j, m in enumerate(members)}
    for i, ex in enumerate(examples):
        for m, v in ex.labels.items():
            y[i, col[m]] = v
    return y


def fit(kind: str, x: np.ndarray, y: np.ndarray, members: list[str], encoder: str, k: int, seed: int) -> RouterModel:
    if kind == "knn":
        return RouterModel("knn", members, encoder, {"embeddings": x, "labels": y}, k=k)
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(np.nan_to_num(y))
    known = torch.from_numpy(~np.isnan(y)).float()
    head = torch.nn.Linear(x.shape[1], len(members))
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(xt), yt, weight=known, reduction="sum")
        opt.zero_grad()
        (loss / known.sum().clamp(min=1)).backward()
        opt.step()
    weight = head.weight.detach().numpy().T.copy()
    bias = head.bias.detach().numpy().copy()
    return RouterModel("linear", members, encoder, {"weight": weight, "bias": bias}, k=k)


def top1(model: RouterModel, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Held-out figures: the router's first choice among the members that answered is right
    (``top1``), any of them is (``oracle``), a member drawn at random is (``random``)."""
    if len(x) == 0:
        return {"examples": 0, "top1": 0.0, "oracle": 0.0, "random": 0.0}
    p = model.predict(x)
    known = ~np.isnan(y)
    p = np.where(known, p, -np.inf)
    first = p.argmax(1)
    hit = np.nan_to_num(y)[np.arange(len(y)), first]
    right = np.nan_to_num(y) * known
    return {
        "examples": len(y),
        "top1": round(float(hit.mean()), 4),
        "oracle": round(float((right.max(1) > 0).mean()), 4),
        "random": round(float((right.sum(1) / known.sum(1).clip(min=1)).mean()), 4),
    }


def train(
    examples: Sequence[Example],
    encoder: str,
    out: Path,
    kind: str = "auto",
    k: int = 16,
    heldout: float = 0.2,
    seed: int = 0,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Fit, measure on the held-out sources, keep the chosen kind (refitted on everything) in ``out``."""
    if kind not in (*KINDS, "auto"):
        raise ValueError(f"kind: {kind!r} is not one of {', '.join((*KINDS, 'auto'))}")
    if len(examples) < 2:
        raise ValueError(f"{len(examples)} usable answers: a router needs at least 2")
    members = sorted({m for ex in examples for m in ex.labels})
    embedder = embedder or Embedder(encoder)
    x = embedder.embed([ex.source for ex in examples])
    y = label_matrix(examples, members)
    test = np.array([_is_heldout(ex.source, heldout) for ex in examples])
    split = bool(test.any() and not test.all())
    if split:
        train_rows, test_rows = ~test, test
    else:  # too few sources to split: measured on what it was fitted on
        train_rows = test_rows = np.ones(len(examples), bool)
    measured = {
        kd: top1(fit(kd, x[train_rows], y[train_rows], members, encoder, k, seed), x[test_rows], y[test_rows])
        for kd in (KINDS if kind == "auto" else (kind,))
    }
    chosen = kind if kind != "auto" else max(KINDS, key=lambda kd: (measured[kd]["top1"], kd == "knn"))
    model = fit(chosen, x, y, members, encoder, k, seed)
    model.info = {
        "examples": len(examples),
        "heldout_examples": int(test_rows.sum()),
        "split": f"{heldout:g} of the sources held out (by hash)" if split else "none: measured on the training set",
        "heldout": measured,
        "chosen": chosen,
    }
    model.save(out)
    return {"out": str(out), "kind": chosen, "members": members, **model.info}


def examples_from_candidates(
    members: Sequence[str], items: Sequence[Any], answers: Sequence[Sequence[str]], keep_unanswered: bool = False
) -> list[Example]:
    """The training recipe's candidates (each member's answer to a training prompt, in ``members``
    order) as examples: a member is right when its answer matches the reference. Prompts no member
    got right teach nothing and are left out, unless ``keep_unanswered``."""
    out = []
    for item, row in zip(items, answers, strict=True):
        labels = {m: float(is_correct(a, item)) for m, a in zip(members, row, strict=True)}
        if keep_unanswered or any(labels.values()):
            out.append(Example(item.prompt, labels))
    return out
