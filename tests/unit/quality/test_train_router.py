"""Router training from stored answers: labels, the held-out measure, the kind kept (a fake embedder)."""

import json
from pathlib import Path
from typing import Any

import numpy as np

from service.models.routers.encoder import RouterModel
from service.quality.train_router import example_of, examples_of, read_records, train


def row(source: str, texts: dict[str, str], ranked: list[str] | None = None) -> dict[str, Any]:
    order = ranked or list(texts)
    return {
        "inputs_hashed": False,
        "input": {"instruction": "", "input_text": source},
        "fused": False,
        "fusion": {"selected": order[:1]},
        "candidates": [{"member": m, "text": texts[m], "rank": order.index(m) + 1} for m in texts],
    }


def note(reference: str | None = None, preferred: str | None = None) -> dict[str, Any]:
    return {"preferred": preferred, "rejected": [], "reference": reference, "rating": None}


def test_labels_from_feedback_from_the_choice_and_samples_as_their_member() -> None:
    r = row("What is 2 plus 2?", {"a": "4", "b": "5", "c#1": "5", "c#2": "4."})
    ex = example_of(r, [note(reference="4")], 80.0)
    assert ex is not None and ex.labels == {"a": 1.0, "b": 0.0, "c": 1.0}
    chosen = example_of(row("q", {"a": "x", "b": "y"}, ranked=["b", "a"]), [], 80.0)
    assert chosen is not None and chosen.labels == {"a": 0.0, "b": 1.0}
    assert example_of(r, [note(reference="7")], 80.0) is None  # nothing right: nothing to learn
    assert example_of({**r, "inputs_hashed": True}, [], 80.0) is None
    assert examples_of([(r, []), (r, [note(reference="4")])], feedback_only=True) == [ex]


class Skills:
    """A fake embedder: a source's skill (its first word) is its direction."""

    def embed(self, sources: list[str]) -> np.ndarray:
        dirs = {"add": [1, 0, 0], "sort": [0, 1, 0], "cap": [0, 0, 1]}
        rng = np.random.default_rng(len(sources))
        x = np.array([dirs[s.split()[0]] for s in sources], dtype=np.float32) + rng.normal(0, 0.05, (len(sources), 3))
        out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        return out


def test_train_measures_both_kinds_and_keeps_the_better(tmp_path: Path) -> None:
    best = {"add": "adder", "sort": "sorter", "cap": "capital"}
    answered = []
    for i in range(90):
        skill = ("add", "sort", "cap")[i % 3]
        texts = {m: ("right" if m == best[skill] else f"wrong{i}") for m in best.values()}
        answered.append((row(f"{skill} {i}", texts), [note(reference="right")]))
    result = train(examples_of(answered), "enc", tmp_path / "r", embedder=Skills())  # type: ignore[arg-type]
    assert set(result["heldout"]) == {"knn", "linear"}
    assert result["heldout"]["knn"]["top1"] == 1.0  # each skill's neighbours share its best member
    assert 0.3 <= result["heldout"]["knn"]["random"] <= 0.34
    assert 0 < result["heldout_examples"] < 90
    model = RouterModel.load(tmp_path / "r")
    assert model.kind == result["kind"] and model.members == ["adder", "capital", "sorter"]
    p = model.predict(Skills().embed(["sort 1000"]))[0]
    assert model.members[int(p.argmax())] == "sorter"


def test_records_file_round_trip(tmp_path: Path) -> None:
    r = row("q", {"a": "x"})
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({**r, "feedback": [note(reference="x")]}) + "\n\n")
    [(back, notes)] = read_records(path)
    assert back["candidates"] == r["candidates"] and notes == [note(reference="x")]
