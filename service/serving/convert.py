"""Wire models to the pipeline's types and back: a ``GenerateRequest`` (every API's request is
first made one, by its wire model) becomes a ``Query``; an ``Answer`` becomes /generate's
response, or the evidence the OpenAI-shaped responses carry as ``ensemble``."""

from __future__ import annotations

from typing import Any

from service.pipeline.types import Answer, Message, Query
from service.protocol import GenerateRequest, GenerateResponse, Usage


def query_of(request: GenerateRequest, ensemble_param: str = "ensemble") -> Query:
    """``ensemble_param``: the client's field that names the ensemble (``model`` on the OpenAI API)."""
    fuse_top_k, fuse_top_k_param = request.candidates_fused
    ext = request.sampling_extensions
    return Query(
        prompt=request.prompt,
        messages=None if request.messages is None else tuple(Message(m.role, m.content) for m in request.messages),
        instruction=request.instruction,
        ensemble=request.ensemble,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        fuse_top_k=fuse_top_k,
        fusion=request.fusion,
        deadline_s=request.deadline_s,
        extensions=ext.wire() if ext is not None else None,
        max_members=request.max_members,
        ensemble_param=ensemble_param,
        fuse_top_k_param=fuse_top_k_param,
        # The OpenAI API carries the ensemble's knobs in its `ensemble` extension object.
        max_members_param="max_members" if ensemble_param == "ensemble" else "ensemble.max_members",
    )


def usage_of(answer: Answer) -> Usage:
    return Usage.model_validate(answer.usage, from_attributes=True)


def generate_response(answer: Answer, with_candidates: bool) -> GenerateResponse:
    """/generate's response, read off the answer's fields (pydantic's ``from_attributes``);
    ``with_candidates``: the request asked for every candidate."""
    response = GenerateResponse.model_validate(answer, from_attributes=True)
    update: dict[str, Any] = {"id": f"gen-{answer.id}"}
    if not with_candidates:
        update["candidates"] = None
    return response.model_copy(update=update)


def evidence(answer: Answer, asked: bool) -> dict[str, Any] | None:
    """What ``ensemble.return_candidates`` adds to an OpenAI-shaped response as ``ensemble``: the
    /generate response's evidence (candidates, selection, failures, timings); None when not asked."""
    if not asked:
        return None
    response = generate_response(answer, with_candidates=True)
    return response.model_dump(exclude_none=True, exclude={"id", "output", "usage", "ensemble"})
