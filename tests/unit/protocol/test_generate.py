"""/generate's request: one input, one name per k, and the limits a wire model enforces itself."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.protocol import GenerateRequest


@pytest.mark.parametrize("body", [{}, {"prompt": "p", "messages": [{"role": "user", "content": "m"}]}])
def test_exactly_one_of_prompt_or_messages(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="exactly one of `prompt` or `messages`"):
        GenerateRequest.model_validate(body)


def test_top_k_is_the_older_name_of_fuse_top_k() -> None:
    assert GenerateRequest(prompt="p", top_k=2).candidates_fused == (2, "top_k")
    assert GenerateRequest(prompt="p", fuse_top_k=2).candidates_fused == (2, "fuse_top_k")
    assert GenerateRequest(prompt="p", fuse_top_k=2, top_k=2).candidates_fused == (2, "fuse_top_k")
    with pytest.raises(ValidationError, match="older name"):
        GenerateRequest(prompt="p", fuse_top_k=2, top_k=3)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="colour"):
        GenerateRequest.model_validate({"prompt": "p", "colour": "red"})
