"""The fuser tests' checkpoints and models: the tiny GenFuser, variants of it, and GenFusers on it."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import FuserConfig
from service.models.checkpoints.tiny import make_genfuser
from service.models.fusers.genfuser import GenFuser
from tests.unit.models.fusers.t5cases import load, prompts, random_t5


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("genfuser-lean")
    make_genfuser(out)
    return out


@pytest.fixture(scope="module")
def tiny(checkpoint: Path) -> tuple[Any, Any]:
    return load(checkpoint)


@pytest.fixture(scope="module")
def ends_early(checkpoint: Path) -> tuple[Any, Any]:
    """The tiny fuser with the end-of-sequence row of lm_head copied from its most frequent token:
    beams end at many lengths, which exercises finished beams and the early-stop heuristic."""
    import torch

    tokenizer, model = load(checkpoint)
    with torch.inference_mode():
        first = model.generate(**prompts(tokenizer, 1, seed=0)[0], num_beams=4, max_new_tokens=40)[0].tolist()
    frequent = collections.Counter(first[1:]).most_common(1)[0][0]
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[frequent]
    return tokenizer, model


@pytest.fixture(scope="module")
def relu_t5(checkpoint: Path) -> tuple[Any, Any]:
    """A random T5 with the plain (non-gated) relu feed-forward, 3 heads of 16, 3+3 layers and
    transformers' default scaling of the decoder output before lm_head."""
    tokenizer, model = random_t5(
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
