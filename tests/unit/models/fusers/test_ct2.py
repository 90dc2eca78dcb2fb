"""The fuser's CTranslate2 engine: the checkpoint converted once into the cache, transformers' model
not loaded, a stream in one piece, and what a missing engine or a hub id gives."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import FuserConfig
from service.errors import ConfigError
from service.models.checkpoints.tiny import make_genfuser
from service.models.fusers import ct2
from service.models.fusers.genfuser import GenFuser
from tests.unit.models.fusers.test_genfuser import CASES

pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("genfuser")
    make_genfuser(out)
    return out


@pytest.fixture(scope="module")
def fuser(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenFuser]:
    cache = tmp_path_factory.mktemp("cache")
    f = GenFuser("ct2", FuserConfig(checkpoint=str(checkpoint), engine="ctranslate2", max_new_tokens=24), cache)
    yield f
    f.close()


@pytest.mark.parametrize(("instruction", "input_text", "candidates"), CASES)
def test_ctranslate2_fuses_without_transformers_model(
    fuser: GenFuser, instruction: str, input_text: str, candidates: list[str]
) -> None:
    """Mechanics on random weights (their beams rarely finish, and among unfinished beams at the length
    limit CTranslate2 and transformers pick differently); parity with transformers' beam search is in
    tests/integration/test_parity.py, on the trained fuser."""
    assert fuser.engine.kind == "ctranslate2" and not hasattr(fuser.engine, "model")  # no torch model beside it
    text = fuser.fuse_sync(instruction, input_text, candidates)
    assert text.strip() and len(fuser.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 24
    assert fuser.fuse_sync(instruction, input_text, candidates) == text


def test_the_conversion_is_cached(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ct2.converted(str(checkpoint), tmp_path)
    assert (first / "model.bin").exists() and first.parent == tmp_path / "ct2"

    class Refuse:
        def __init__(self, *_: Any) -> None:
            raise AssertionError("converted again")

    import ctranslate2

    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", Refuse)
    assert ct2.converted(str(checkpoint), tmp_path) == first
    with pytest.raises(ConfigError, match="not a local directory"):
        ct2.converted("some-org/some-hub-id", tmp_path)


def test_a_stream_gets_the_text_in_one_piece(fuser: GenFuser) -> None:
    async def pieces() -> list[str]:
        return [p async for p in fuser.fuse_stream(*CASES[0])]

    got = asyncio.run(pieces())
    assert got == [fuser.fuse_sync(*CASES[0])]
