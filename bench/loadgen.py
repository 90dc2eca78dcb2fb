"""A lean HTTP/1.1 load generator: keep-alive connections over raw asyncio streams.

The generator shares the machine with what it measures, so it spends as little as it can per
request: one pre-built request per connection, the status line and ``content-length`` parsed,
the body read and kept as bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class Connection:
    """One keep-alive connection; reopened when the server has closed it (an idle timeout)."""

    def __init__(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.host, self.port = host, port
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(host, port, reader, writer)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            self.writer.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(raw)
            status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:].strip())
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def post_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def closed_loop(call: Callable[[int], Awaitable[bool]], workers: int, seconds: float) -> LoadResult:
    """``workers`` callers, each calling again as soon as its last call returned, for ``seconds``.
    ``call(worker)`` returns whether the call succeeded."""
    result = LoadResult()
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            ok = await call(w)
            if ok:
                result.latencies.append(time.perf_counter() - t)
            else:
                result.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    result.seconds = time.perf_counter() - start
    return result


async def sequential(call: Callable[[int], Awaitable[bool]], count: int) -> LoadResult:
    """One call after another: latency without queueing."""
    result = LoadResult()
    start = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        if await call(0):
            result.latencies.append(time.perf_counter() - t)
        else:
            result.errors += 1
    result.seconds = time.perf_counter() - start
    return result
