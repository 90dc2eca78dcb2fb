"""The members' HTTP client on both transports against real sockets: same answers, and the same
kind of error for each way a server fails (a refused or dropped connection must not read as a
timeout: only connection errors are retried)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from service.members.http import make_http_client, send

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TRANSPORTS = ["aiohttp", "httpx"]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            body = await _read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        out = b'{"echo": ' + body + b"}"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(out))
        writer.write(out)
        await writer.drain()
    writer.close()


async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"choi')
    await writer.drain()
    writer.close()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await asyncio.sleep(30)


async def _serve(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def _post(transport: str, url: str, timeout: float = 5.0, direct: bool = False) -> httpx.Response:
    client = make_http_client(8, transport)  # type: ignore[arg-type]
    try:
        if direct:
            extensions = {"timeout": httpx.Timeout(timeout).as_dict()}
            return await send(client, httpx.Request("POST", url + "/v1/x", json={"a": 1}, extensions=extensions))
        return await client.post(url + "/v1/x", json={"a": 1}, timeout=timeout)
    finally:
        await client.aclose()


DIRECT = pytest.mark.parametrize("direct", [False, True], ids=["client", "direct"])


@DIRECT
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_answers_and_keeps_the_connection(transport: str, direct: bool) -> None:
    connections = 0

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await ok(reader, writer)

    async for url in _serve(counted):
        client = make_http_client(8, transport)  # type: ignore[arg-type]
        try:
            for i in range(3):
                if direct:
                    r = await send(client, httpx.Request("POST", url + "/v1/x", json={"i": i}))
                else:
                    r = await client.post(url + "/v1/x", json={"i": i})
                assert r.status_code == 200 and r.json() == {"echo": {"i": i}}
                assert r.request.url.path == "/v1/x"
        finally:
            await client.aclose()
    assert connections == 1


@DIRECT
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refused_connection_is_a_connect_error(transport: str, direct: bool) -> None:
    with pytest.raises(httpx.ConnectError):
        await _post(transport, _refused_url(), direct=direct)


@DIRECT
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("handler", [truncated, hang_up], ids=["truncated", "hang_up"])
async def test_a_dropped_answer_is_a_transport_error_not_a_timeout(
    transport: str, handler: Handler, direct: bool
) -> None:
    async for url in _serve(handler):
        with pytest.raises(httpx.TransportError) as info:
            await _post(transport, url, direct=direct)
        assert not isinstance(info.value, httpx.TimeoutException), repr(info.value)


@DIRECT
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_silence_is_a_timeout(transport: str, direct: bool) -> None:
    async for url in _serve(silent):
        with pytest.raises(httpx.TimeoutException):
            await _post(transport, url, timeout=0.3, direct=direct)


async def test_a_stream_arrives_in_pieces_and_gives_its_connection_back() -> None:
    async def events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"data: a\n\n", b"data: b\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        writer.close()

    async for url in _serve(events):
        client = make_http_client(8, "aiohttp")
        try:
            for _ in range(2):
                async with client.stream("POST", url + "/v1/x", json={}) as r:
                    lines = [line async for line in r.aiter_lines() if line]
                assert lines == ["data: a", "data: b"]
        finally:
            await client.aclose()
