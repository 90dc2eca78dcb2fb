"""Administration (admin key): reload the configuration file without a restart."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.protocol import ERROR_RESPONSES
from service.serving.api.deps import RuntimeDep

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/reload", responses=ERROR_RESPONSES)
async def reload(runtime: RuntimeDep) -> dict[str, Any]:
    """Re-read the config file the gateway started with. It is validated in full first; if it is
    invalid, or a new server or model fails to start, the running configuration keeps serving and
    this answers with the error. Requests in flight finish on the configuration they started on."""
    changes = await runtime.reload_from_file()
    return {"reloaded": True, "changes": changes}
