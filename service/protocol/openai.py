"""The OpenAI-compatible surface's wire models: chat and text completions, their stream chunks, and
the model list. Each request converts to /generate's ``GenerateRequest`` (which the serving layer makes
the pipeline's ``Query``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    model_serializer,
)

from service.errors import RequestError
from service.protocol.generate import (
    MAX_MESSAGES,
    MAX_PROMPT_CHARS,
    SAMPLING_EXTENSIONS,
    ChatMessage,
    GenerateRequest,
    Metadata,
    SamplingExtensions,
    Usage,
    Wire,
)

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


class TextPart(Wire):
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


class StreamOptions(Wire):
    include_usage: bool = False


class EnsembleOptions(Wire):
    """The ensemble's own knobs on the OpenAI API, in one extension object (``ensemble``) whose
    names cannot collide with OpenAI's or vLLM's request fields."""

    fuse_top_k: int | None = Field(None, ge=1, description="Candidates fused; at most the members.")
    fusion: Literal["always", "adaptive", "never"] | None = Field(None, description="This request's fusion policy.")
    return_candidates: bool = Field(
        False, description="Add the evidence (candidates, scores, ranks, failures, timings) as `ensemble`."
    )
    instruction: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="Task instruction.")
    deadline_s: float | None = Field(None, ge=1.0, le=3600, description="Answer within this many seconds.")
    max_members: int | None = Field(
        None, ge=1, le=1024, description="Members called at most; it may only lower the ensemble's cap."
    )

    def request_fields(self, instruction: str | None = None, deadline_s: float | None = None) -> dict[str, Any]:
        """These knobs as ``GenerateRequest`` fields; ``instruction`` and ``deadline_s``: values set
        elsewhere in the request, which these override."""
        return {
            "instruction": self.instruction if self.instruction is not None else instruction,
            "deadline_s": self.deadline_s if self.deadline_s is not None else deadline_s,
            "fuse_top_k": self.fuse_top_k,
            "fusion": self.fusion,
            "return_candidates": self.return_candidates,
            "max_members": self.max_members,
        }


def refuse(field: str | None) -> None:
    """A 400 naming the first field set that an ensemble cannot honour (None: nothing to refuse)."""
    if field is not None:
        raise RequestError(f"`{field}` is not supported by an ensemble", param=field, code="unsupported_field")


class _OpenAIRequest(SamplingExtensions):
    """Fields shared by chat and text completions; ``model`` names an ensemble. vLLM's sampling
    extensions (``top_k``, ``min_p``, ``ignore_eos``, ...; inherited from ``SamplingExtensions``) are
    accepted at the top level as vLLM takes them and passed to the members; the ensemble's own knobs
    are in ``ensemble``."""

    model: str = Field(description="An ensemble name (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Per-member token limit; bounds the answer.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int | None = Field(None, description="Only 1: an ensemble returns one answer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    metadata: Metadata = Field(None, description="Kept with the answer in the store.")
    presence_penalty: float | None = Field(None, description="Only 0.")
    frequency_penalty: float | None = Field(None, description="Only 0.")
    logprobs: Any = Field(None, description="Not supported.")
    top_logprobs: Any = Field(None, description="Not supported.")
    # Extensions of this gateway.
    ensemble: EnsembleOptions | None = Field(None, description="Extension: the ensemble's own knobs.")
    instruction: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="Extension: task instruction (also `ensemble.instruction`)."
    )
    deadline_s: float | None = Field(
        None, ge=1.0, le=3600, description="Extension: answer within this many seconds (also `ensemble.deadline_s`)."
    )

    def _generate(self, **fields: Any) -> GenerateRequest:
        refuse(self.unsupported())
        extensions = self.model_dump(include=set(SAMPLING_EXTENSIONS), exclude_none=True)
        return GenerateRequest(
            ensemble=self.model,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stream=self.stream,
            sampling_extensions=SamplingExtensions(**extensions) if extensions else None,
            **(self.ensemble or EnsembleOptions()).request_fields(self.instruction, self.deadline_s),
            **fields,
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
    store: bool | None = Field(None, description="Accepted (the gateway's store keeps every answer it records).")

    def unsupported(self) -> str | None:
        for f in UNSUPPORTED_CHAT_FIELDS:
            value = getattr(self, f)
            if value is not None and not (f == "response_format" and value == {"type": "text"}):
                return f
        return super().unsupported()

    def to_generate(self) -> GenerateRequest:
        """The request as /generate's; a ``RequestError`` names a field it cannot honour."""
        messages = [
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in self.messages
        ]
        return self._generate(messages=messages, max_tokens=self.max_completion_tokens or self.max_tokens)


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
        """The request as /generate's; a ``RequestError`` names a field it cannot honour."""
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return self._generate(prompt=prompt, max_tokens=self.max_tokens)


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str
    logprobs: None = None


class _DropsUnset(BaseModel):
    """A response whose optional extras (``usage`` of a chunk, the ``ensemble`` evidence) are left
    out when unset, as OpenAI leaves out what it did not send; other nulls stay."""

    ensemble: dict[str, Any] | None = Field(None, description="With `ensemble.return_candidates`: the evidence.")

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("usage", "ensemble"):
            if key in data and data[key] is None:
                del data[key]
        return data


class ChatCompletionResponse(_DropsUnset):
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


class CompletionResponse(_DropsUnset):
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


class _Chunk(_DropsUnset):
    id: str
    created: int
    model: str
    usage: Usage | None = Field(None, description="Only in the last chunk, with `stream_options.include_usage`.")


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
