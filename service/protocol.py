"""Wire models: what clients send and receive. One base model; extra fields are refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


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
    timings_ms: Timings
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
