"""The lean T5 decode path (service/models/fusers/t5decode.py) against transformers' own generate: the
same output token ids, on the tiny GenFuser checkpoint (gated-gelu, unscaled outputs), a variant of it
that ends beams early, and random T5s with the plain relu feed-forward and other shapes; several
prompts in shared steps (batched fusion) get the ids and logits they get alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.models.fusers.t5cases import prompts, random_t5


def _check_same_ids(tokenizer: Any, model: Any, settings: list[tuple[int, int]], count: int, seed: int) -> set[int]:
    import torch

    from service.models.fusers.t5decode import LeanT5

    assert LeanT5.unsupported_model(model) is None
    lean = LeanT5(model)
    lengths = set()
    for i, enc in enumerate(prompts(tokenizer, count, seed)):
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
    _check_same_ids(*tiny, [(4, 128), (2, 16), (1, 32), (4, 9), (3, 24)], count=5, seed=1)


def test_beams_that_end_early_same_ids_as_generate(ends_early: tuple[Any, Any]) -> None:
    lengths = _check_same_ids(*ends_early, [(4, 128), (2, 40), (1, 40), (5, 30)], count=6, seed=2)
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
        _check_same_ids(tokenizer, model, [(4, 48), (3, 30)], count=2, seed=3)
    finally:
        model.generation_config = saved


def test_plain_relu_t5_same_ids_as_generate(relu_t5: tuple[Any, Any]) -> None:
    _check_same_ids(*relu_t5, [(4, 128), (2, 20), (1, 30), (4, 12)], count=4, seed=4)


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
    encs = prompts(tokenizer, 6, seed=11)
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
    encs = prompts(tokenizer, 3, seed=12)
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

    tokenizer, model = random_t5(
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
    encs = prompts(tokenizer, 4, seed=13)
    settings = [(4, 24), (4, 10), (2, 16), (4, 20)]
    alone = []
    for enc, (beams, limit) in zip(encs, settings, strict=True):
        plan: Any = lean.prepare(beams, limit, num_return_sequences=1)
        alone.append(lean.generate(enc["input_ids"], enc["attention_mask"], plan))
    assert _batched_ids(lean, encs, settings, stagger=2) == alone
