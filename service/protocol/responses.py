"""The Responses API's wire models (``POST /v1/responses``, OpenAI's current API): the request, the
response object, and its stream's events. The request converts to /generate's ``GenerateRequest``
(which the serving layer makes the pipeline's ``Query``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.errors import RequestError
from service.protocol.generate import (
    MAX_MESSAGES,
    MAX_PROMPT_CHARS,
    ChatMessage,
    GenerateRequest,
    Metadata,
    TokenCounts,
    Wire,
)
from service.protocol.openai import EnsembleOptions, refuse

# Part types of an input message that carry text; any other (images, files, audio) is a 400.
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(Wire):
    """POST /v1/responses. Fields an ensemble cannot honour are refused with a 400 naming them;
    harmless ones (``user``, caching hints) are accepted. With the gateway's store on, a response is
    kept (``store``, default true) and can be read, deleted and continued
    (``previous_response_id``) by the key that created it."""

    model: str = Field(description="An ensemble name (see GET /v1/models).")
    input: str | list[dict[str, Any]] = Field(description="Text, or a list of messages (`role`, `content`).")
    instructions: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="A system message, first.")
    max_output_tokens: int | None = Field(None, ge=1, le=32768, description="Bounds every member and the answer.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    metadata: Metadata = Field(None, description="Echoed in the response and kept with it in the store.")
    user: str | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(
        None, description="Whether the response can be read again and continued (default true; needs the store)."
    )
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_retention: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    truncation: Literal["auto", "disabled"] | None = Field(None, description="Accepted; prompts are never cut.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted (there are no tools).")
    max_tool_calls: int | None = Field(None, description="Accepted (there are no tools).")
    text: dict[str, Any] | None = Field(None, description='Only `{"format": {"type": "text"}}`.')
    include: list[str] | None = Field(None, description="Only empty.")
    tools: list[Any] | None = Field(None, description="Only empty: an ensemble calls no tools.")
    tool_choice: Any = Field(None, description="Only `none` or `auto` (there are no tools).")
    previous_response_id: str | None = Field(
        None, max_length=128, description="Continue from a stored response: its turns come before `input`."
    )
    conversation: Any = Field(None, description="Not supported: nothing is stored.")
    prompt: Any = Field(None, description="Not supported: stored prompt templates.")
    background: bool | None = Field(None, description="Only false.")
    reasoning: Any = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, description="Only 0.")
    # Extension of this gateway.
    ensemble: EnsembleOptions | None = Field(None, description="Extension: the ensemble's own knobs.")

    def unsupported(self) -> str | None:
        """The first field set that the ensemble cannot honour, if any."""
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        for f in ("conversation", "prompt", "reasoning"):
            if getattr(self, f) is not None:
                return f
        if self.background:
            return "background"
        if self.include:
            return "include"
        if self.top_logprobs not in (None, 0):
            return "top_logprobs"
        if self.text is not None:
            fmt = self.text.get("format", {"type": "text"})
            if set(self.text) - {"format", "verbosity"} or not isinstance(fmt, dict) or fmt.get("type") != "text":
                return "text"
        return None

    def messages(self, before: list[ChatMessage] | None = None) -> list[ChatMessage]:
        """The conversation: ``instructions`` as a system message, the turns ``before`` (of the
        previous response, whose instructions are not carried over), then the input."""
        out = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        out += before or []
        if isinstance(self.input, str):
            if len(self.input) > MAX_PROMPT_CHARS:
                raise RequestError(f"input: at most {MAX_PROMPT_CHARS} characters", param="input")
            return [*out, ChatMessage(role="user", content=self.input)]
        if not self.input:
            raise RequestError("input: give at least one message", param="input")
        if len(self.input) > MAX_MESSAGES:
            raise RequestError(f"input: at most {MAX_MESSAGES} messages", param="input")
        for i, item in enumerate(self.input):
            out.append(_message(item, f"input.{i}"))
        return out

    def to_generate(self, before: list[ChatMessage] | None = None) -> GenerateRequest:
        """The request as /generate's (after the turns ``before``); a ``RequestError`` names a field
        it cannot honour."""
        refuse(self.unsupported())
        return GenerateRequest(
            messages=self.messages(before),
            ensemble=self.model,
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stream=self.stream,
            **(self.ensemble or EnsembleOptions()).request_fields(),
        )


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    """One input item as a chat message: an easy message (``role``, ``content``) or a ``message``
    item; other item types (tool calls and their outputs, reasoning) are refused."""
    kind = item.get("type", "message")
    if kind != "message":
        raise RequestError(f"{where}: input items of type {kind!r} are not supported", param=where)
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise RequestError(f"{where}.role: one of user, system, developer, assistant", param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") not in TEXT_PARTS
                or not isinstance(part.get("text"), str)
            ):
                what = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    f"{where}.content.{j}: only text parts are supported, not {what!r}", param=f"{where}.content.{j}"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content: text, or a list of text parts", param=f"{where}.content")
    if len(content) > MAX_PROMPT_CHARS:
        raise RequestError(f"{where}.content: at most {MAX_PROMPT_CHARS} characters", param=f"{where}.content")
    return ChatMessage(role="system" if role == "developer" else role, content=content)


# --- the response object ----------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int
    members: dict[str, TokenCounts] = Field(default_factory=dict, description="Each answering member's own counts.")


class ResponseObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputMessage]
    usage: ResponseUsage | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    store: bool = False
    previous_response_id: str | None = None
    reasoning: None = None
    background: bool = False
    user: str | None = None
    ensemble: dict[str, Any] | None = Field(None, description="With `ensemble.return_candidates`: the evidence.")

    def wire(self) -> dict[str, Any]:
        data = self.model_dump()
        if data["ensemble"] is None:
            del data["ensemble"]
        return data
