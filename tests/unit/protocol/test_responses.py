"""The Responses API's request made into /generate's: instructions first, message items and their
text parts, and refusals that name the item or field."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import RequestError
from service.protocol import ResponsesRequest


def generate(**body: Any) -> Any:
    return ResponsesRequest.model_validate({"model": "demo", **body}).to_generate()


def test_instructions_lead_and_parts_join() -> None:
    request = generate(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "d"},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_output_tokens=7,
    )
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("system", "d"), ("user", "ab")]
    assert request.ensemble == "demo" and request.max_tokens == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input.0.content.0"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"input": "q", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "q", "conversation": "conv_1"}, "conversation"),
        ({"input": []}, "input"),
    ],
)
def test_what_an_ensemble_cannot_take_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as e:
        generate(**body)
    assert e.value.param == param
