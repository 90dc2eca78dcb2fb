"""The lean T5 decode path (service/t5decode.py) against transformers' own generate: the same output
token ids, on the tiny GenFuser checkpoint (gated-gelu, unscaled outputs), a variant of it that ends
beams early (end-of-sequence competes with a frequent token), and a random T5 with the plain relu
feed-forward, other head counts and scaled outputs. GenFuser's streaming and fallbacks on top."""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import FuserConfig
from service.models.checkpoints.tiny import make_genfuser
from service.models.fusers.genfuser import GenFuser, genfuser_input

WORDS = [
    "the",
    "river",
    "runs",
    "through",
    "old",
    "city",
    "and",
    "music",
    "plays",
    "paris",
    "capital",
    "of",
    "france",
    "seine",
    "short",
    "answer",
]


def _prompts(tokenizer: Any, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        candidates = [" ".join(rng.choices(WORDS, k=rng.randint(1, 70))) for _ in range(rng.randint(1, 4))]
        text = genfuser_input(
            tokenizer,
            rng.choice(["", "Answer briefly. ", "Explain: "]),
            " ".join(rng.choices(WORDS, k=rng.randint(1, 25))),
            candidates,
            128,
        )
        out.append(tokenizer(text, max_length=1024, truncation=True, add_special_tokens=False, return_tensors="pt"))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("genfuser-lean")
    make_genfuser(out)
    return out


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny(checkpoint: Path) -> tuple[Any, Any]:
    return _load(checkpoint)


@pytest.fixture(scope="module")
def ends_early(checkpoint: Path) -> tuple[Any, Any]:
    """The tiny fuser with the end-of-sequence row of lm_head copied from its most frequent token:
    beams end at many lengths, which exercises finished beams and the early-stop heuristic."""
    import torch

    tokenizer, model = _load(checkpoint)
    with torch.inference_mode():
        first = model.generate(**_prompts(tokenizer, 1, seed=0)[0], num_beams=4, max_new_tokens=40)[0].tolist()
    frequent = collections.Counter(first[1:]).most_common(1)[0][0]
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[frequent]
    return tokenizer, model


def _random_t5(checkpoint: Path, seed: int, **shape: Any) -> tuple[Any, Any]:
    """A random T5 of ``shape`` over the tiny fuser's tokenizer, with its generation settings (and
    none in the model config, which the lean path refuses)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    config = T5Config(vocab_size=len(tokenizer), **shape, **ids)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**ids)
    return tokenizer, model


@pytest.fixture(scope="module")
def relu_t5(checkpoint: Path) -> tuple[Any, Any]:
    """A random T5 with the plain (non-gated) relu feed-forward, 3 heads of 16, 3+3 layers and
    transformers' default scaling of the decoder output before lm_head."""
    tokenizer, model = _random_t5(
        checkpoint,
        7,
        d_model=48,
        d_kv=16,
        d_ff=96,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=3,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        feed_forward_proj="relu",
    )
    config = model.config
    assert not config.is_gated_act and config.dense_act_fn == "relu" and config.scale_decoder_outputs
    return tokenizer, model


def _check_same_ids(tokenizer: Any, model: Any, settings: list[tuple[int, int]], prompts: int, seed: int) -> set[int]:
    import torch

    from service.models.fusers.t5decode import LeanT5

    assert LeanT5.unsupported_model(model) is None
    lean = LeanT5(model)
    lengths = set()
    for i, enc in enumerate(_prompts(tokenizer, prompts, seed)):
        num_beams, max_new_tokens = settings[i % len(settings)]
        with torch.inference_mode():
            want = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens, num_return_sequences=1)
        plan = lean.prepare(num_beams, max_new_tokens, num_return_sequences=1)
        assert not isinstance(plan, str), plan
        got = lean.generate(enc["input_ids"], enc["attention_mask"], plan)
        assert got is not None
        assert got == want[0].tolist(), (i, num_beams, max_new_tokens)
        lengths.add(len(got))
    return lengths


def test_tiny_fuser_same_ids_as_generate(tiny: tuple[Any, Any]) -> None:
    _check_same_ids(*tiny, [(4, 128), (2, 16), (1, 32), (4, 9), (3, 24)], prompts=5, seed=1)


def test_beams_that_end_early_same_ids_as_generate(ends_early: tuple[Any, Any]) -> None:
    lengths = _check_same_ids(*ends_early, [(4, 128), (2, 40), (1, 40), (5, 30)], prompts=6, seed=2)
    assert len(lengths) > 2, "beams end at several lengths"


@pytest.mark.parametrize(("early_stopping", "length_penalty"), [(True, 1.0), ("never", 0.5), (False, -1.0)])
def test_early_stopping_and_length_penalty(
    ends_early: tuple[Any, Any], early_stopping: bool | str, length_penalty: float
) -> None:
    tokenizer, model = ends_early
    saved = model.generation_config
    model.generation_config = saved.__class__(
        **saved.to_diff_dict(), early_stopping=early_stopping, length_penalty=length_penalty
    )
    try:
        _check_same_ids(tokenizer, model, [(4, 48), (3, 30)], prompts=2, seed=3)
    finally:
        model.generation_config = saved


def test_plain_relu_t5_same_ids_as_generate(relu_t5: tuple[Any, Any]) -> None:
    _check_same_ids(*relu_t5, [(4, 128), (2, 20), (1, 30), (4, 12)], prompts=4, seed=4)


@pytest.mark.parametrize(
    "setting",
    [
        {"no_repeat_ngram_size": 3},
        {"repetition_penalty": 1.2},
        {"do_sample": True},
        {"min_new_tokens": 5},
        {"min_length": 3},
        {"forced_eos_token_id": 1},
        {"suppress_tokens": [5]},
        {"bad_words_ids": [[5]]},
        {"num_return_sequences": 2},
        {"eos_token_id": [1, 2]},
        {"max_time": 1.0},
    ],
)
def test_unsupported_settings_are_refused(tiny: tuple[Any, Any], setting: dict[str, Any]) -> None:
    from service.models.fusers.t5decode import LeanT5

    plan = LeanT5(tiny[1]).prepare(4, 16, **setting)
    assert isinstance(plan, str)


@pytest.fixture(scope="module")
def fusers(checkpoint: Path) -> Iterator[dict[bool, GenFuser]]:
    made = {
        lean: GenFuser("genfuser", FuserConfig(checkpoint=str(checkpoint), lean_decode=lean, max_new_tokens=32))
        for lean in (True, False)
    }
    assert made[True].engine.kind == "lean" and made[False].engine.kind == "generate"
    yield made
    for f in made.values():
        f.close()


CASE = ("Answer briefly. ", "Name a river.", ["The Seine runs through Paris.", "river river", "I do not know"])


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


def _batched_ids(lean: Any, encs: list[dict[str, Any]], settings: list[tuple[int, int]], stagger: int) -> list[Any]:
    """Each prompt decoded in one shared step loop, prompt i joining after ``stagger * i`` steps."""
    decodes: list[Any] = [None] * len(encs)
    step = 0
    while any(d is None or not d.done for d in decodes):
        for i, enc in enumerate(encs):
            if decodes[i] is None and step >= stagger * i:
                plan = lean.prepare(*settings[i % len(settings)], num_return_sequences=1)
                decodes[i] = lean.start(enc["input_ids"], enc["attention_mask"], plan)
        lean.step([d for d in decodes if d is not None])
        step += 1
    return [d.result() for d in decodes]


@pytest.mark.parametrize("model_name", ["tiny", "ends_early", "relu_t5"])
def test_batched_steps_give_each_prompt_the_ids_of_generate(model_name: str, request: pytest.FixtureRequest) -> None:
    """Prompts of mixed lengths, beam counts and limits, joining at different steps, share every
    decoder step: each gets exactly the ids transformers' generate gives it alone."""
    import torch

    from service.models.fusers.t5decode import LeanT5

    tokenizer, model = request.getfixturevalue(model_name)
    encs = _prompts(tokenizer, 6, seed=11)
    assert len({int(e["input_ids"].shape[1]) for e in encs}) > 3, "mixed input lengths"
    settings = [(4, 40), (4, 12), (2, 30), (1, 25), (4, 128), (3, 20)]
    want = []
    for enc, (beams, limit) in zip(encs, settings, strict=True):
        with torch.inference_mode():
            want.append(model.generate(**enc, num_beams=beams, max_new_tokens=limit)[0].tolist())
    lean = LeanT5(model)
    for stagger in (0, 3):
        assert _batched_ids(lean, encs, settings, stagger) == want, stagger


@pytest.mark.parametrize("model_name", ["tiny", "skinny_t5"])
def test_batched_logits_are_bit_identical_to_alone(model_name: str, request: pytest.FixtureRequest) -> None:
    """The premise: a batched step's logits for a prompt's rows are the floats it gets alone
    (with the skinny products, whose floats depend on the row count, on the wide model)."""
    import torch

    from service.models.fusers.products import SKINNY_MIN_WEIGHTS, SKINNY_ROWS
    from service.models.fusers.t5decode import LeanT5

    tokenizer, model = request.getfixturevalue(model_name)
    lean = LeanT5(model, SKINNY_MIN_WEIGHTS, SKINNY_ROWS)
    encs = _prompts(tokenizer, 3, seed=12)
    plan: Any = lean.prepare(4, 16, num_return_sequences=1)
    alone: list[Any] = [lean.start(e["input_ids"], e["attention_mask"], plan) for e in encs]
    together: list[Any] = [lean.start(e["input_ids"], e["attention_mask"], plan) for e in encs]
    with torch.inference_mode():
        for d in alone:
            lean.step([d])  # moves past the first step, where every beam holds the start token
        lean.step(together)
        want = [lean.logits([d]) for d in alone]
        got = lean.logits(together)
    assert torch.equal(got, torch.cat(want))


@pytest.fixture(scope="module")
def skinny_t5(checkpoint: Path) -> tuple[Any, Any]:
    """A random T5 wide enough (d_model 512) for the skinny products, whose floats depend on the row
    count: a batched step must run them per prompt."""
    import torch

    tokenizer, model = _random_t5(
        checkpoint,
        8,
        d_model=512,
        d_kv=64,
        d_ff=1024,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return tokenizer, model


def test_batched_skinny_products_give_the_ids_alone(skinny_t5: tuple[Any, Any]) -> None:
    from service.models.fusers.products import SKINNY_MIN_WEIGHTS, SKINNY_ROWS
    from service.models.fusers.t5decode import LeanT5

    tokenizer, model = skinny_t5
    lean = LeanT5(model, SKINNY_MIN_WEIGHTS, SKINNY_ROWS)
    assert all(layer.wo.numel() >= SKINNY_MIN_WEIGHTS for layer in lean.layers)
    encs = _prompts(tokenizer, 4, seed=13)
    settings = [(4, 24), (4, 10), (2, 16), (4, 20)]
    alone = []
    for enc, (beams, limit) in zip(encs, settings, strict=True):
        plan: Any = lean.prepare(beams, limit, num_return_sequences=1)
        alone.append(lean.generate(enc["input_ids"], enc["attention_mask"], plan))
    assert _batched_ids(lean, encs, settings, stagger=2) == alone


CASES = [
    ("Answer briefly. ", "Name a river.", ["The Seine runs through Paris.", "river river", "I do not know"]),
    ("", "x " * 300, ["a", " ".join(WORDS * 10), "short"]),
    ("Explain: ", "old city", ["music plays", "the"]),
    ("", "one", ["only this one candidate here"]),
    ("Answer briefly. ", "capital of france", ["paris", "the seine", "old city music"]),
]


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
