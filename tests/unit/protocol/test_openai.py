"""The OpenAI API's wire models: stream chunks as OpenAI sends them, and the requests made into
/generate's request (fields an ensemble cannot honour refused by name)."""

from __future__ import annotations

import json

import pytest

from service.errors import RequestError
from service.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
    Usage,
)


def test_chunks_carry_only_what_changed() -> None:
    piece = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChatChunkChoice(delta=ChatDelta(content="hi"))])
    data = json.loads(piece.model_dump_json())
    assert data["choices"][0]["delta"] == {"content": "hi"}
    assert data["choices"][0]["finish_reason"] is None and data["object"] == "chat.completion.chunk"
    assert "usage" not in data  # only the usage chunk has it
    last = piece.model_copy(
        update={"choices": [], "usage": Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)}
    )
    assert json.loads(last.model_dump_json())["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
        "members": {},
    }
    assert "ensemble" not in data  # the evidence only where asked for


def test_openai_requests_name_the_ensemble_by_model() -> None:
    chat = ChatCompletionRequest.model_validate(
        {"model": "demo", "messages": [{"role": "developer", "content": "x"}], "max_completion_tokens": 5}
    ).to_generate()
    assert chat.ensemble == "demo" and chat.max_tokens == 5
    assert chat.messages is not None and chat.messages[0].role == "system"
    text = CompletionRequest.model_validate({"model": "demo", "prompt": ["once"]}).to_generate()
    assert text.prompt == "once" and text.ensemble == "demo"


@pytest.mark.parametrize(("extra", "field"), [({"n": 2}, "n"), ({"stop": ["\n"]}, "stop")])
def test_unsupported_fields_are_refused_naming_the_field(extra: dict[str, object], field: str) -> None:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}], **extra})
    with pytest.raises(RequestError) as e:
        body.to_generate()
    assert e.value.param == field and e.value.code == "unsupported_field"
