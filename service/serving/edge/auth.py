"""API keys: client keys for the API, the admin key for ``/admin``; compared in constant time
against every configured key. Routes declare who may call them (``access``)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import GatewayConfig
from service.errors import AuthenticationError, GatewayError, PermissionDenied
from service.serving.edge.access import Access, access_map
from service.serving.edge.errors import header, send_error


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant time in the key's content: every configured key is compared, always."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def _match(given: str, keys: list[tuple[str | None, str]]) -> tuple[bool, str | None]:
    """Whether ``given`` is one of ``keys`` and that key's name; constant time in the keys' content."""
    found, name = False, None
    for key_name, key in keys:
        hit = hmac.compare_digest(given.encode(), key.encode())
        found |= hit
        if hit:
            name = key_name
    return found, name


def key_id(key: str) -> str:
    """What names an unnamed client key in the store and the logs: a digest, never the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class AuthMiddleware:
    def __init__(self, app: ASGIApp, config: Callable[[], GatewayConfig]):
        self.app = app
        self.config = config
        self._access: dict[str, Access] | None = None  # read from the app's routes on first use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._access is None:
            self._access = access_map(scope["app"])
        try:
            self.authorize(self._access.get(scope["path"], "clients"), scope)
        except GatewayError as e:
            await send_error(send, e)
            return
        await self.app(scope, receive, send)

    def authorize(self, access: Access, scope: Scope) -> None:
        auth = self.config().auth
        if access == "public":
            return
        if access == "probes" and not auth.protect_health:
            return
        if access == "metrics" and not auth.protect_metrics:
            return
        scheme, _, given = header(scope, b"authorization").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        if access == "admin":
            admin = auth.admin_key()
            if admin is None:
                raise PermissionDenied("the admin API is disabled: set the admin key (auth.admin_key_env)")
            if not given or not key_matches(given, [admin]):
                raise AuthenticationError("a valid admin key is required", code="invalid_api_key")
            return
        keys = auth.named_keys()
        if not keys:
            return
        found, name = _match(given, keys) if given else (False, None)
        if not found:
            raise AuthenticationError("a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
        # A named key is known by its name (auth.keys), an unnamed one by its digest.
        scope.setdefault("state", {})["key_id"] = name if name is not None else key_id(given)
