"""POST /generate: one prompt in, one ensemble answer out, with its evidence."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.deps import AdmissionDep, MetricsDep, PipelineDep
from service.api.requests import run_tracked
from service.api.streaming import answer_events, chat_chunk, now, stream_response
from service.protocol import ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter()

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


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when `stream` is true."},
    },
)
async def generate(
    body: GenerateRequest, pipeline: PipelineDep, metrics: MetricsDep, admission: AdmissionDep
) -> GenerateResponse | StreamingResponse | JSONResponse:
    """Fan the prompt out to the ensemble's members, rank the candidates, fuse the best."""
    tracker, staged, response = await run_tracked(pipeline, metrics, admission, body.ensemble, lambda: body)
    if response is not None:
        return JSONResponse(response.model_dump(exclude_none=True))
    created = now()
    return stream_response(
        answer_events(
            pipeline,
            staged,
            first=chat_chunk(staged.id, created, staged.name, {"role": "assistant", "content": ""}, None),
            chunk=lambda piece, last: chat_chunk(
                staged.id, created, staged.name, {} if last else {"content": piece}, "stop" if last else None
            ),
            on_done=lambda r: [{"object": "ensemble.result", **r.model_dump(exclude_none=True)}],
            on_end=tracker.end,
        ),
        tracker.end,
    )
