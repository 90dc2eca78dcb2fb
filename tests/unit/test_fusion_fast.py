"""GenFuser's shared cross-attention cache: the same text as transformers' plain beam search,
on a tiny T5 written for the test (the parity with Blender.fuse itself is in
tests/integration/test_parity.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.config import FuserConfig
from service.fusion import GenFuser
from service.tiny import make_genfuser

LONG = " ".join(["the river runs through the old city and the music plays"] * 20)
CASES = [
    ("", "What is the capital of France?", ["Paris is the capital", "to to to to", "I do not know what"]),
    ("Answer briefly. ", "Name a river.", ["The Seine.", "river river"]),
    ("Summarize: ", "x", [LONG, "short one", LONG[:300]]),
    ("", "one candidate", ["only this"]),
]


@pytest.fixture(scope="module")
def fusers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, GenFuser]]:
    out = tmp_path_factory.mktemp("genfuser")
    make_genfuser(out)
    made = {
        shared: GenFuser("genfuser", FuserConfig(checkpoint=str(out), shared_cross_cache=shared))
        for shared in (True, False)
    }
    yield made
    for f in made.values():
        f.close()


@pytest.mark.parametrize(("instruction", "input_text", "candidates"), CASES)
def test_shared_cross_cache_gives_the_plain_text(
    fusers: dict[bool, GenFuser], instruction: str, input_text: str, candidates: list[str]
) -> None:
    fast = fusers[True].fuse_sync(instruction, input_text, candidates)
    assert fast == fusers[False].fuse_sync(instruction, input_text, candidates)
    assert fast.strip()


def test_reordering_skips_only_the_cross_attention_cache(fusers: dict[bool, GenFuser]) -> None:
    import torch

    from service.fusion import _shared_cross_cache

    cache = _shared_cross_cache()
    k = torch.arange(8.0).view(2, 1, 2, 2)
    cache.self_attention_cache.update(k, k, 0)
    cache.cross_attention_cache.update(k, k, 0)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.self_attention_cache.layers[0].keys, k[[1, 1]])
    assert torch.equal(cache.cross_attention_cache.layers[0].keys, k)
