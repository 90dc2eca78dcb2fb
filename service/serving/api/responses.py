"""POST /v1/responses: OpenAI's Responses API, each ensemble a model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.protocol import ERROR_RESPONSES, ResponseObject, ResponsesRequest
from service.serving.accounting import EnsembleRoute
from service.serving.api.deps import ResponsesDep

router = APIRouter(prefix="/v1", route_class=EnsembleRoute)


@router.post(
    "/responses",
    response_model=ResponseObject,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_response(body: ResponsesRequest, serving: ResponsesDep) -> Response:
    """Run the ensemble named by `model` on the input; `stream: true` sends OpenAI's event sequence."""
    return await serving.create(body)


@router.get("/responses/{response_id}", response_model=ResponseObject, responses=ERROR_RESPONSES)
async def get_response(response_id: str, serving: ResponsesDep) -> Response:
    """A stored response (only to the key that created it)."""
    return await serving.read(response_id)


@router.delete("/responses/{response_id}", responses=ERROR_RESPONSES)
async def delete_response(response_id: str, serving: ResponsesDep) -> Response:
    """Delete a stored response: it can no longer be read or continued."""
    return await serving.delete(response_id)
