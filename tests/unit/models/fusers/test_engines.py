"""GenFuser's engines side by side: the lean decoder streams, cancels and falls back to transformers'
generate exactly as generate itself does."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from service.models.fusers.genfuser import GenFuser
from tests.unit.models.fusers.t5cases import CASE


def test_streaming_gives_the_same_pieces(fusers: dict[bool, GenFuser]) -> None:
    pieces: dict[bool, list[str]] = {True: [], False: []}
    texts = {lean: fusers[lean].fuse_sync(*CASE, on_text=pieces[lean].append) for lean in (True, False)}
    assert texts[True] == texts[False] and texts[True].strip()
    assert "".join(pieces[True]) == texts[True]
    assert len(pieces[True]) > 2, "text streams before the search ends"
    assert pieces[True] == pieces[False]


def test_cancel_stops_like_generate(fusers: dict[bool, GenFuser]) -> None:
    cancel = threading.Event()
    cancel.set()
    texts = {lean: fusers[lean].fuse_sync(*CASE, cancel=cancel) for lean in (True, False)}
    assert texts[True] == texts[False]
    assert len(fusers[True].tokenizer.encode(texts[True], add_special_tokens=False)) <= 2


def test_unsupported_generation_config_falls_back(
    fusers: dict[bool, GenFuser], monkeypatch: pytest.MonkeyPatch
) -> None:
    fuser = fusers[True]
    want = fusers[False].fuse_sync(*CASE)
    calls: list[Any] = []
    engine: Any = fuser.engine
    monkeypatch.setattr(engine.lean, "generate", lambda *a, **k: calls.append(a))
    saved = engine.model.generation_config
    monkeypatch.setattr(
        engine.model, "generation_config", saved.__class__(**saved.to_diff_dict(), no_repeat_ngram_size=3)
    )
    got = fuser.fuse_sync(*CASE)
    assert not calls, "the lean path refused"
    monkeypatch.setattr(engine.model, "generation_config", saved)
    assert fusers[False].fuse_sync(*CASE) == want
    # no_repeat_ngram_size=3 changes the text here, so the fallback really ran generate with it.
    assert got != want


# -- batched steps (service/models/fusers/fusebatch.py) ------------------------------------------------
