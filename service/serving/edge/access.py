"""Who may call a route, as the route itself declares it with a tag (one of ``ACCESS``); a route
without one needs a client key. FastAPI's own documentation routes are public. Where a route is
served (``ops_paths``): the operators' routes are those tagged ``metrics`` or ``ops``."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.routing import APIRoute

Access = Literal["public", "probes", "metrics", "admin", "clients"]
ACCESS: tuple[Access, ...] = ("public", "probes", "metrics", "admin")


def access_map(app: Any) -> dict[str, Access]:
    """Each path of ``app``'s routes with the access its tags declare."""
    out: dict[str, Access] = {}
    for route in app.routes:
        if isinstance(route, APIRoute):
            tagged = [t for t in ACCESS if t in route.tags]
            out[route.path] = tagged[0] if tagged else "clients"
    for path in (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url):
        if path:
            out[path] = "public"
    return out


def ops_paths(app: Any) -> frozenset[str]:
    """The paths that ``serve --ops-port`` moves to the operators' port: metrics, status, status page."""
    return frozenset(
        route.path for route in app.routes if isinstance(route, APIRoute) and ({"metrics", "ops"} & set(route.tags))
    )
