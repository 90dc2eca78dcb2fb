"""/generate's wire models: the request, the response with its evidence, and its stream's last event."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256
# OpenAI's limits on a request's `metadata`: 16 pairs, keys of 64 characters, values of 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def _metadata_limits(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:
        return v
    if len(v) > METADATA_PAIRS:
        raise ValueError(f"at most {METADATA_PAIRS} pairs")
    for key, value in v.items():
        if len(key) > METADATA_KEY_CHARS:
            raise ValueError(f"keys of at most {METADATA_KEY_CHARS} characters")
        if len(value) > METADATA_VALUE_CHARS:
            raise ValueError(f"values of at most {METADATA_VALUE_CHARS} characters")
    return v


Metadata = Annotated[dict[str, str] | None, AfterValidator(_metadata_limits)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Wire):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class SamplingExtensions(Wire):
    """vLLM's sampling extensions (fields of its ``SamplingParams`` beyond OpenAI's), as vLLM's own
    clients send them. The gateway passes them to every member (``MemberConfig.extensions``); the
    ranker and GenFuser do not sample, so they do not apply there."""

    top_k: int | None = Field(None, ge=-1, description="Top-k sampling (0 or -1: off).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Min-p sampling.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0, le=32768, description="Tokens to generate before EOS may end.")
    ignore_eos: bool | None = Field(None, description="Generate up to max_tokens, past EOS.")
    stop_token_ids: list[int] | None = Field(
        None, max_length=256, description="Token ids that end generation (each member's own tokenizer)."
    )
    bad_words: list[str] | None = Field(None, max_length=256, description="Words never generated.")
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="Keep only the prompt's last tokens.")

    def wire(self) -> dict[str, object]:
        """The fields set, as a member's request body takes them."""
        return self.model_dump(exclude_none=True)


SAMPLING_EXTENSIONS = tuple(SamplingExtensions.model_fields)


class GenerateRequest(Wire):
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
    fuse_top_k: int | None = Field(None, ge=1, description="Candidates fused; at most the members.")
    top_k: int | None = Field(
        None, ge=1, description="The older name of `fuse_top_k` (on /generate only: the OpenAI API's `top_k` samples)."
    )
    sampling_extensions: SamplingExtensions | None = Field(
        None, description="vLLM's sampling extensions (top_k sampling, min_p, ...), passed to the members."
    )
    max_members: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Members called at most for this request (the router's most likely first, else the first "
        "listed); it may only lower the ensemble's `max_member_calls`.",
    )
    return_candidates: bool = Field(False, description="Include every candidate in the response.")
    fusion: Literal["always", "adaptive", "never"] | None = Field(
        None, description="This request's fusion policy instead of the ensemble's (e.g. `always` for an eval)."
    )
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
    metadata: Metadata = Field(None, description="The client's own labels, kept with the answer in the store.")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.top_k is not None and self.fuse_top_k is not None and self.top_k != self.fuse_top_k:
            raise ValueError("`top_k` is the older name of `fuse_top_k`: give one")
        return self

    @property
    def candidates_fused(self) -> tuple[int | None, str]:
        """The request's own count of candidates to fuse (None: the ensemble's), and the field that set it."""
        if self.fuse_top_k is not None:
            return self.fuse_top_k, "fuse_top_k"
        return self.top_k, "top_k"


class Candidate(Wire):
    member: str
    text: str
    score: float | None = Field(None, description="Ranker score; higher is better.")
    rank: int = Field(description="1 = best; ties share the better rank.")
    votes: int | None = Field(
        None, description="With `vote`: how many candidates gave this answer (normalized), itself included."
    )
    latency_ms: float
    finish_reason: str | None = None


class NotCalledMember(Wire):
    member: str
    reason: Literal["routed", "cascade_not_needed", "cap"] = Field(
        description="routed: the router put it below the ensemble's `route`; cascade_not_needed: the first "
        "members' answer was certain; cap: over `max_member_calls` or the request's `max_members`."
    )


class FailedMember(Wire):
    member: str
    error: str
    kind: str | None = Field(
        None,
        description="timeout, connect, http_5xx, http_4xx, invalid_response, circuit_open, unavailable, "
        "deadline, or straggler (the quorum had answered and the gateway stopped waiting).",
    )


class Timings(Wire):
    members: float = Field(description="Fan-out, until the last awaited member answered.")
    rank: float
    fuse: float
    total: float


class TokenCounts(Wire):
    prompt_tokens: int
    completion_tokens: int


class Usage(Wire):
    """Tokens as a client accounts for them: the answer it receives is the completion."""

    prompt_tokens: int = Field(description="Summed over the members (each read the prompt).")
    completion_tokens: int = Field(
        description="The answer's tokens: the fused text's (by the fuser's tokenizer), else the top candidate's."
    )
    total_tokens: int
    members: dict[str, TokenCounts] = Field(
        default_factory=dict, description="Each answering member's own counts (its server's usage)."
    )


class GenerateResponse(Wire):
    id: str
    ensemble: str
    output: str = Field(description="The fused answer (or the top candidate when not fused).")
    fused: bool
    selected: list[str] = Field(description="Members fed to the fuser, in rank order.")
    candidates: list[Candidate] | None = None
    failed_members: list[FailedMember]
    not_called: list[NotCalledMember] = Field(
        default_factory=list, description="Members this request did not call (routing), and why."
    )
    degraded: bool = Field(
        False, description="True when a member failed, or the ranker or fuser failed and the answer came without it."
    )
    degraded_reasons: list[str] = Field(default_factory=list, description="Why, one entry per cause.")
    timings_ms: Timings
    usage: Usage


class EnsembleResult(GenerateResponse):
    """/generate's last event before [DONE]: the whole response, ranking evidence included."""

    object: Literal["ensemble.result"] = "ensemble.result"
