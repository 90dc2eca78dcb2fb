"""An error the edge refuses a request with, sent in the OpenAI error shape."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Scope

from service.errors import GatewayError
from service.protocol import error_payload


def header(scope: Scope, name: bytes) -> str:
    """A request header's value ('' when absent); ``name`` in lower case."""
    for k, v in scope["headers"]:
        if k.lower() == name:
            return str(v.decode("latin-1"))
    return ""


async def send_error(send: Callable[[Message], Any], e: GatewayError) -> None:
    body = json.dumps(error_payload(e)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if e.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
