"""The status page at ``/`` and its data at ``/status.json`` (served by the gateway itself: no CDN)."""

from __future__ import annotations

import time
from importlib.resources import files
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from service.config import package_version
from service.serving.api.deps import RuntimeDep

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False, tags=["public", "ops"])
async def page() -> HTMLResponse:
    html = files("service.serving").joinpath("static/status.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/status.json", tags=["metrics"])
async def status(runtime: RuntimeDep) -> dict[str, Any]:
    """Each ensemble's members with health, circuit, p50 latency, win rate and selection share;
    the last requests with their ranking; the gateway's own counters."""
    config = runtime.config
    health = await runtime.probe_members()
    book = runtime.status
    ensembles: dict[str, Any] = {}
    for name, ens in config.ensembles.items():
        members = []
        for m in ens.members:
            state = runtime.guards.state(m)
            members.append(
                {
                    "name": m,
                    "kind": config.member(m).kind,
                    "up": health.get(m, "unknown") is None,
                    "error": health.get(m),
                    "circuit": state["circuit"],
                    **book.member(name, m),
                }
            )
        ensembles[name] = {
            "members": members,
            "ranker": ens.ranker,
            "fuser": ens.fuser,
            "fusion": ens.fusion,
            "fusion_margin": ens.fusion_margin,
            "fuse_top_k": ens.fuse_top_k,
            "quorum": ens.effective_quorum,
            "routing": {
                "router": ens.router,
                "route": ens.route.members if ens.route is not None else None,
                "cascade": ens.cascade.model_dump() if ens.cascade is not None else None,
                "max_member_calls": ens.max_member_calls,
                **book.routed(name),
            },
        }
    admission = runtime.admission
    return {
        "time": time.time(),
        "uptime_s": round(time.time() - book.started, 1),
        "version": package_version(),
        "default_ensemble": config.default,
        "answered": book.answered,
        "in_flight": admission.running,
        "queued": admission.queued,
        "draining": admission.draining,
        "reloads": runtime.reloads,
        "auth": {"keys_required": bool(config.auth.client_keys())},
        "warnings": runtime.warnings(),
        "store": runtime.lasting.store.state() if runtime.lasting.store is not None else None,
        "limits": runtime.lasting.limiter.status() if runtime.lasting.limiter is not None else None,
        "ensembles": ensembles,
        "recent": list(book.recent),
    }
