"""The operators' port (``serve --ops-port``): the metrics, the status data and the status page are
served there only, and the API's port answers 404 for them, so a Service or a firewall that exposes
the API's port exposes none of them. The probes answer on both ports; nothing else on the
operators' port. Without an operators' port everything is served on the one port."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import NotFoundError
from service.serving.edge.access import access_map, ops_paths
from service.serving.edge.errors import send_error


class PortsMiddleware:
    def __init__(self, app: ASGIApp, ops_port: int | None):
        self.app = app
        self.ops_port = ops_port
        self._ops: frozenset[str] | None = None  # read from the app's routes on first use
        self._probes: frozenset[str] = frozenset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.ops_port is None:
            await self.app(scope, receive, send)
            return
        if self._ops is None:
            self._ops = ops_paths(scope["app"])
            self._probes = frozenset(p for p, access in access_map(scope["app"]).items() if access == "probes")
        path = scope["path"]
        server = scope.get("server") or (None, None)
        if server[1] == self.ops_port:
            served = path in self._ops or path in self._probes
            where = "the API's port"
        else:
            served = path not in self._ops
            where = "the operators' port (serve --ops-port)"
        if not served:
            await send_error(send, NotFoundError(f"{path} is served on {where}"))
            return
        await self.app(scope, receive, send)
