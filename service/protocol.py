"""Wire models: what clients send and receive, stream chunks included, and the one function that
turns a gateway error into the OpenAI error body. One base model for requests; extra fields are
refused."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_serializer,
    model_serializer,
    model_validator,
)

from service.errors import GatewayError, RequestError

MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class GenerateRequest(_Wire):
    """POST /generate. Give ``prompt`` or ``messages``, not both.

    Members receive the conversation (chat members) or its text (completion members). Ranking and
    fusion see ``instruction`` (default: the ensemble's) and an ``input`` text: the prompt itself,
    or for ``messages`` the content of a lone user message, else each message as a
    ``"role: content"`` line, joined with newlines.
    """

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="The user's input.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=MAX_MESSAGES, description="A chat conversation instead."
    )
    instruction: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Task instruction, prepended for members and used by ranker and fuser.",
    )
    ensemble: str | None = Field(None, description="Ensemble name; default: the configured one.")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Per-member token limit.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    top_k: int | None = Field(None, ge=1, description="Candidates fused; at most the members.")
    return_candidates: bool = Field(False, description="Include every candidate in the response.")
    deadline_s: float | None = Field(
        None,
        ge=1.0,
        le=3600,
        description="Answer within this many seconds (at least 1); the ensemble's deadline still bounds it.",
    )
    stream: bool = Field(
        False,
        description="Server-sent events: the answer in OpenAI chat chunks as it is generated, then one "
        "`ensemble.result` event with the whole response (ranking evidence included), then [DONE].",
    )

    # The field that named the ensemble, for its error: ``model`` when it came from the OpenAI API.
    _ensemble_param: str = PrivateAttr("ensemble")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    @property
    def ensemble_param(self) -> str:
        return self._ensemble_param


class Candidate(_Wire):
    member: str
    text: str
    score: float | None = Field(None, description="Ranker score; higher is better.")
    rank: int = Field(description="1 = best; ties share the better rank.")
    latency_ms: float
    finish_reason: str | None = None


class FailedMember(_Wire):
    member: str
    error: str
    kind: str | None = Field(
        None,
        description="timeout, connect, http_5xx, http_4xx, invalid_response, circuit_open, unavailable, "
        "deadline, or straggler (the quorum had answered and the gateway stopped waiting).",
    )


class Timings(_Wire):
    members: float = Field(description="Fan-out, until the last awaited member answered.")
    rank: float
    fuse: float
    total: float


class Usage(_Wire):
    prompt_tokens: int = Field(description="Summed over members.")
    completion_tokens: int = Field(description="Summed over members.")
    total_tokens: int


class GenerateResponse(_Wire):
    id: str
    ensemble: str
    output: str = Field(description="The fused answer (or the top candidate when not fused).")
    fused: bool
    selected: list[str] = Field(description="Members fed to the fuser, in rank order.")
    candidates: list[Candidate] | None = None
    failed_members: list[FailedMember]
    degraded: bool = Field(
        False, description="True when a member failed, or the ranker or fuser failed and the answer came without it."
    )
    degraded_reasons: list[str] = Field(default_factory=list, description="Why, one entry per cause.")
    timings_ms: Timings
    usage: Usage
    # For the OpenAI surface: ``stop`` for a fused answer, else the top candidate's own reason.
    _finish_reason: str = PrivateAttr("stop")

    @property
    def finish_reason(self) -> str:
        return self._finish_reason

    def finished(self, reason: str) -> GenerateResponse:
        self._finish_reason = reason
        return self


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_payload(error: GatewayError) -> dict[str, Any]:
    """The OpenAI error body of a gateway error: for a response, and for a stream's error event."""
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code or error.type)
    return ErrorResponse(error=detail).model_dump()


# The error responses every ensemble endpoint may give, for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "Invalid request (bad JSON, wrong types, out-of-range or unsupported values)."),
        (401, "Missing or wrong API key."),
        (404, "Unknown ensemble (model)."),
        (413, "Request body too large."),
        (429, "Overloaded: too many requests in flight and queued; retry after `Retry-After` seconds."),
        (500, "Internal error."),
        (502, "Too few members answered."),
        (503, "Not ready, or shutting down."),
        (504, "Too few members answered before the deadline."),
    ]
}


# --- OpenAI-compatible surface ----------------------------------------------------------------

# Fields of OpenAI's API that would change results in ways an ensemble cannot honour: a request
# that sets one (to anything but its neutral value) gets a 400 naming it.
UNSUPPORTED_CHAT_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "stop",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
)


class TextPart(_Wire):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class OpenAIChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Wire):
    include_usage: bool = False


def _named_by_model(request: GenerateRequest) -> GenerateRequest:
    request._ensemble_param = "model"
    return request


def _refuse_unsupported(body: _OpenAIRequest) -> None:
    field = body.unsupported()
    if field is not None:
        raise RequestError(f"`{field}` is not supported by an ensemble", param=field, code="unsupported_field")


class _OpenAIRequest(_Wire):
    """Fields shared by chat and text completions; ``model`` names an ensemble."""

    model: str = Field(description="An ensemble name (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Per-member token limit.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, description="Only 1: an ensemble returns one answer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    presence_penalty: float | None = Field(None, description="Only 0.")
    frequency_penalty: float | None = Field(None, description="Only 0.")
    logprobs: Any = Field(None, description="Not supported.")
    top_logprobs: Any = Field(None, description="Not supported.")
    # Extensions of this gateway.
    top_k: int | None = Field(None, ge=1, description="Extension: candidates fused.")
    instruction: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="Extension: task instruction.")
    deadline_s: float | None = Field(
        None, ge=1.0, le=3600, description="Extension: answer within this many seconds (at least 1)."
    )

    def unsupported(self) -> str | None:
        """The first field set that the ensemble cannot honour, if any."""
        if self.n not in (None, 1):
            return "n"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.top_logprobs not in (None, 0):
            return "top_logprobs"
        for f in ("presence_penalty", "frequency_penalty"):
            if getattr(self, f) not in (None, 0, 0.0):
                return f
        return None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[OpenAIChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    stop: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored.")

    def unsupported(self) -> str | None:
        for f in UNSUPPORTED_CHAT_FIELDS:
            value = getattr(self, f)
            if value is not None and not (f == "response_format" and value == {"type": "text"}):
                return f
        return super().unsupported()

    def to_generate(self) -> GenerateRequest:
        """The request as the pipeline takes it; a ``RequestError`` names a field it cannot honour."""
        _refuse_unsupported(self)
        messages = [
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in self.messages
        ]
        request = GenerateRequest(
            messages=messages,
            ensemble=self.model,
            instruction=self.instruction,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            top_k=self.top_k,
            deadline_s=self.deadline_s,
            stream=self.stream,
        )
        return _named_by_model(request)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = Field(description="A prompt (a list of exactly one is accepted).")
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    stop: Any = None
    logit_bias: Any = None

    def unsupported(self) -> str | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt"
        for f in ("echo", "suffix", "stop", "logit_bias"):
            if getattr(self, f) not in (None, False):
                return f
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()

    def to_generate(self) -> GenerateRequest:
        """The request as the pipeline takes it; a ``RequestError`` names a field it cannot honour."""
        _refuse_unsupported(self)
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        request = GenerateRequest(
            prompt=prompt,
            ensemble=self.model,
            instruction=self.instruction,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            top_k=self.top_k,
            deadline_s=self.deadline_s,
            stream=self.stream,
        )
        return _named_by_model(request)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ensemble-gateway"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- stream chunks (server-sent events) -------------------------------------------------------


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None

    @field_serializer("delta")
    def _delta(self, delta: ChatDelta) -> dict[str, Any]:
        return delta.model_dump(exclude_none=True)  # OpenAI's deltas carry only what changed


class _Chunk(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage | None = Field(None, description="Only in the last chunk, with `stream_options.include_usage`.")

    @model_serializer(mode="wrap")
    def _drop_empty_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class EnsembleResult(GenerateResponse):
    """/generate's last event before [DONE]: the whole response, ranking evidence included."""

    object: Literal["ensemble.result"] = "ensemble.result"
