"""POST /generate: one prompt in, one ensemble answer out, with its evidence."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.protocol import ERROR_RESPONSES, GenerateRequest, GenerateResponse
from service.serving.accounting import EnsembleRoute
from service.serving.api.deps import GenerateDep

router = APIRouter(route_class=EnsembleRoute)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when `stream` is true."},
    },
)
async def generate(body: GenerateRequest, serving: GenerateDep) -> Response:
    """Fan the prompt out to the ensemble's members, rank the candidates, fuse the best."""
    return await serving.create(body)
