"""What a request becomes on its way in: its limits checked, the text ranker and fuser see, and
the conversation members receive."""

from __future__ import annotations

from service.config import LimitsConfig
from service.errors import RequestError
from service.protocol import GenerateRequest


def check_limits(request: GenerateRequest, limits: LimitsConfig) -> None:
    """Refuse a request over the configured size limits, naming the field."""
    chars = len(request.prompt or "") + len(request.instruction or "")
    chars += sum(len(m.content) for m in request.messages or [])
    if chars > limits.max_prompt_chars:
        param = "messages" if request.messages else "prompt"
        raise RequestError(
            f"the prompt has {chars} characters; the limit is {limits.max_prompt_chars}",
            param=param,
            code="prompt_too_long",
        )
    if request.messages and len(request.messages) > limits.max_messages:
        raise RequestError(
            f"{len(request.messages)} messages; the limit is {limits.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    if request.max_tokens is not None and request.max_tokens > limits.max_tokens:
        raise RequestError(
            f"max_tokens={request.max_tokens} exceeds the limit {limits.max_tokens}",
            param="max_tokens",
            code="max_tokens_too_large",
        )


def input_text(request: GenerateRequest) -> str:
    """The ``input`` that ranker and fuser see (see ``GenerateRequest``)."""
    if request.prompt is not None:
        return request.prompt
    messages = request.messages or []
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def member_messages(request: GenerateRequest, instruction: str) -> list[dict[str, str]]:
    """The conversation members receive: the instruction, if any, leads the first user turn."""
    if request.prompt is not None:
        messages = [{"role": "user", "content": request.prompt}]
    else:
        messages = [{"role": m.role, "content": m.content} for m in request.messages or []]
    if instruction:
        for m in messages:
            if m["role"] == "user":
                m["content"] = f"{instruction}\n\n{m['content']}"
                break
    return messages
