"""Batched fusion (service/models/fusers/fusebatch.py): concurrent fusions share the lean decoder's
steps and each keeps the text and stream it gets alone; a cancelled stream leaves the others."""

from __future__ import annotations

from service.models.fusers.genfuser import GenFuser
from tests.unit.models.fusers.t5cases import CASES


async def test_concurrent_fusions_share_steps_and_keep_their_text(fusers: dict[bool, GenFuser]) -> None:
    """Fusions sent at once are decoded together, and each text and stream is the one it gets alone
    (and the one transformers' generate gives)."""
    import asyncio

    batched, plain = fusers[True], fusers[False]
    assert batched.batcher is not None and plain.batcher is None
    alone = [plain.fuse_sync(*case) for case in CASES]
    pieces_alone: list[list[str]] = []
    for case in CASES:
        pieces_alone.append([])
        plain.fuse_sync(*case, on_text=pieces_alone[-1].append)

    async def stream(case: tuple[str, str, list[str]]) -> list[str]:
        return [p async for p in batched.fuse_stream(*case)]

    texts = await asyncio.gather(*(batched.fuse(*case) for case in CASES))
    streams = await asyncio.gather(*(stream(case) for case in CASES))
    assert list(texts) == alone
    assert [[p for p in s if p] for s in streams] == [[p for p in s if p] for s in pieces_alone]
    assert batched.batcher.largest_batch > 1, "the fusions shared steps"


async def test_a_cancelled_stream_leaves_the_others(fusers: dict[bool, GenFuser]) -> None:
    import asyncio

    batched, plain = fusers[True], fusers[False]
    want = plain.fuse_sync(*CASES[1])

    async def first_piece() -> str:
        async for piece in batched.fuse_stream(*CASES[0]):
            return piece  # leaving the stream cancels its search
        return ""

    piece, other = await asyncio.gather(first_piece(), batched.fuse(*CASES[1]))
    assert piece and other == want
