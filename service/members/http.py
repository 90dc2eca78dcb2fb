"""The HTTP client the gateway talks to its members with.

The API is httpx's everywhere (members, the LLM fuser, the unit tier's ``httpx.MockTransport``).
Underneath, by default, sits aiohttp through httpx-aiohttp's transport: httpx's own connection pool
costs milliseconds per request under concurrency (encode/httpx#3215); on this project's
benchmark a 4-way fan-out costs 7-11 ms on httpx's pool and 2.7-5 ms on aiohttp's, and a gateway
on it serves ~6x the requests per second (docs/PERFORMANCE.md). ``member_http: httpx`` in the
config falls back to httpx's own pool.

httpx-aiohttp 0.2.0 maps every ``aiohttp.ClientConnectionError`` to ``httpx.ConnectTimeout``, so a
refused connection or a server that hung up mid-answer would read as a timeout (and a refused
connection would not be retried). ``_Transport`` restores the distinction from the aiohttp cause.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

HttpTransport = Literal["aiohttp", "httpx"]


def _remap(exc: httpx.TransportError) -> httpx.TransportError:
    """The httpx error the aiohttp cause of ``exc`` stands for (``exc`` itself when it is right)."""
    cause = exc.__cause__
    if not isinstance(exc, httpx.ConnectTimeout) or cause is None:
        return exc
    if isinstance(cause, aiohttp.ConnectionTimeoutError | aiohttp.ServerTimeoutError):
        return exc
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(cause))
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(str(cause) or "server disconnected")
    if isinstance(cause, aiohttp.ClientConnectionError):
        return httpx.ReadError(str(cause) or type(cause).__name__)
    return exc


@contextlib.contextmanager
def _remapped() -> Iterator[None]:
    """Re-raise httpx-aiohttp's transport errors as the httpx error their aiohttp cause stands for."""
    try:
        yield
    except httpx.TransportError as e:
        better = _remap(e)
        if better is e:
            raise
        raise better from e.__cause__


class _Stream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream):
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _remapped():
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _remapped():
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Stream(response.stream)
        return response


def make_http_client(max_connections: int, transport: HttpTransport = "aiohttp") -> httpx.AsyncClient:
    """The one client all members share; per-call timeouts come from each member."""
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    timeout = httpx.Timeout(60.0, connect=5.0)
    if transport == "httpx":
        return httpx.AsyncClient(timeout=timeout, limits=limits)
    return httpx.AsyncClient(timeout=timeout, transport=_Transport(limits=limits))
