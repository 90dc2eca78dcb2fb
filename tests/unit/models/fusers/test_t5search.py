"""The lean decoder's plan: the generation settings it does not implement are refused, by name."""

from __future__ import annotations

from typing import Any

import pytest


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
