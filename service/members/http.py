"""The HTTP client the gateway talks to its members with.

The API is httpx's everywhere (members, the LLM fuser, the unit tier's ``httpx.MockTransport``).
Underneath, by default, sits aiohttp's connection pool behind an httpx transport
(``AiohttpTransport``): httpx's own pool costs milliseconds per request under concurrency
(encode/httpx#3215); on this project's benchmark a 4-way fan-out costs 7-11 ms on httpx's pool and
2.7-5 ms on aiohttp's, and a gateway on it serves ~6x the requests per second
(docs/PERFORMANCE.md). ``member_http: httpx`` in the config falls back to httpx's own pool.

Two measured costs shape this module (in-process 4-way fan-out to 4 stub members at 20 ms, 32
closed-loop callers, requests/s, 2 runs; bare aiohttp 1,244-1,330):
- ``AsyncClient.request`` (URL merging and parsing, cookies, auth and redirect layers, event
  hooks) costs a third of the throughput: 734-850 through it, 1,074-1,117 with the same request
  handed straight to the transport. Member calls use none of those layers, so ``MemberClient.
  send_direct`` sends an ``httpx.Request`` to the transport and returns its ``httpx.Response``;
- httpx-aiohttp's transport (0.2.0) reads bodies in 16 KiB chunks through two stream wrappers,
  builds a timeout per request, and maps every ``aiohttp.ClientConnectionError`` to
  ``httpx.ConnectTimeout`` (a refused connection or a server that hung up mid-answer read as a
  timeout, and a refused connection was not retried). ``AiohttpTransport`` here maps each aiohttp
  error to the httpx error it stands for and reads what arrives: 1,148-1,261 with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import aiohttp
import httpx

HttpTransport = Literal["aiohttp", "httpx"]


def _httpx_error(exc: aiohttp.ClientError) -> httpx.TransportError:
    """The httpx error an aiohttp failure stands for."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
        return httpx.ReadError(message)
    return httpx.TransportError(message)


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientError as e:
        raise _httpx_error(e) from e


class _Body(httpx.AsyncByteStream):
    """An aiohttp response's body as it arrives; closing it gives the connection back (or drops
    it, when the body was not read to the end)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests sent through one aiohttp session (created on first use, in the running loop).

    Members are reached directly: proxy variables from the environment are not used. aiohttp's
    ``trust_env`` would read them, and ~/.netrc, on every request (measured: the fan-out above at
    590-651 requests/s with it, 1,155-1,165 without)."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                keepalive_timeout=self._limits.keepalive_expiry or 15.0,
                ssl=httpx.create_ssl_context(),
            )
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)
        return self._session

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        t = request.extensions.get("timeout") or {}
        key = (t.get("connect"), t.get("read"), t.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(sock_connect=key[0], sock_read=key[1], connect=key[2])
            if len(self._timeouts) < 256:
                self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            content: bytes | None = request.content
        except httpx.RequestNotRead:
            content = await request.aread()
        with _mapped():
            response = await self._get_session().request(
                request.method,
                str(request.url),
                data=content or None,
                headers=request.headers.multi_items(),
                allow_redirects=False,
                compress=False,
                timeout=self._timeout(request),
            )
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class MemberClient(httpx.AsyncClient):
    """httpx's client over one transport, with ``send_direct`` for the calls on the hot path."""

    def __init__(self, transport: httpx.AsyncBaseTransport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self.member_transport = transport

    async def send_direct(self, request: httpx.Request) -> httpx.Response:
        """``send(request)`` without the client's per-request layers (cookies, auth, redirects, event
        hooks, proxy mounts: member calls use none of them); the body read and the connection
        given back before it returns."""
        response = await self.member_transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


async def send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """One whole request: straight to the transport where the client allows it."""
    if isinstance(client, MemberClient):
        return await client.send_direct(request)
    return await client.send(request)


def make_http_client(max_connections: int, transport: HttpTransport = "aiohttp") -> MemberClient:
    """The one client all members share; per-call timeouts come from each member."""
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    timeout = httpx.Timeout(60.0, connect=5.0)
    if transport == "httpx":
        # Proxies from the environment are not used here either (httpx mounts them on the client).
        return MemberClient(httpx.AsyncHTTPTransport(limits=limits), timeout=timeout, trust_env=False)
    # trust_env off: httpx would mount its own transports for proxies from the environment.
    return MemberClient(AiohttpTransport(limits), timeout=timeout, trust_env=False)
