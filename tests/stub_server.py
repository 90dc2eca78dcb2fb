"""A scripted OpenAI-like server for fault and load tests: ``python -m tests.stub_server --port P``.

The ``model`` of each request picks its behaviour (so one process serves every fault):

    ok          a chat/text completion after ``--delay-ms``
    err500      HTTP 500 with a JSON error
    badjson     HTTP 200 whose body is not JSON
    truncated   HTTP 200 announcing more bytes than it sends, then the connection closes
    drip        HTTP 200 whose body arrives one byte every ``--drip-ms``
    hang        reads the request and never answers
    flaky       the first call with a given prompt fails with 500, the next ones answer

Raw asyncio streams rather than a framework, so that a response can be cut or dripped exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

MODELS = ["ok", "err500", "badjson", "truncated", "drip", "hang", "flaky"]


class Stub:
    def __init__(self, delay_ms: float, drip_ms: float):
        self.delay_s = delay_ms / 1000
        self.drip_s = drip_ms / 1000
        self.seen: set[str] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, body = request
                if not await self.respond(writer, method, path, body):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def respond(self, writer: asyncio.StreamWriter, method: str, path: str, body: bytes) -> bool:
        """Answer one request; False when the connection must close."""
        if method == "GET" and path.endswith("/models"):
            data = {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]}
            return await _send(writer, 200, json.dumps(data).encode())
        if method == "GET" and path == "/health":
            return await _send(writer, 200, b"{}")
        if method != "POST" or not path.endswith("completions"):
            return await _send(writer, 404, b'{"error": {"message": "not found"}}')
        try:
            req = json.loads(body)
            model = str(req.get("model", "ok"))
        except ValueError:
            return await _send(writer, 400, b'{"error": {"message": "bad json"}}')
        if model == "hang":
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay_s)
        if model == "flaky":
            key = json.dumps(req.get("messages") or req.get("prompt"))
            first = key not in self.seen
            self.seen.add(key)
            if first:
                return await _send(writer, 500, b'{"error": {"message": "scripted transient failure"}}')
        if model == "err500":
            return await _send(writer, 500, b'{"error": {"message": "scripted failure"}}')
        if model == "badjson":
            return await _send(writer, 200, b"<html>this is not json")
        payload = json.dumps(_completion(req, path)).encode()
        if model == "truncated":
            head = _head(200, len(payload) + 100)
            writer.write(head + payload[: len(payload) // 2])
            await writer.drain()
            return False
        if model == "drip":
            writer.write(_head(200, len(payload)))
            for i in range(len(payload)):
                writer.write(payload[i : i + 1])
                await writer.drain()
                await asyncio.sleep(self.drip_s)
            return True
        return await _send(writer, 200, payload)


def _completion(req: dict[str, object], path: str) -> dict[str, object]:
    messages = req.get("messages")
    prompt = messages[-1].get("content", "") if isinstance(messages, list) and messages else req.get("prompt", "")
    text = f"answer from {req.get('model')} to: {str(prompt)[:40]}"
    usage = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    base = {"id": "stub-1", "created": int(time.time()), "model": req.get("model"), "usage": usage}
    if path.endswith("chat/completions"):
        msg = {"role": "assistant", "content": text}
        return {**base, "object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}
    return {**base, "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    length = 0
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return method, path, body


def _head(status: int, length: int) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
        "connection: keep-alive\r\n\r\n"
    ).encode()


async def _send(writer: asyncio.StreamWriter, status: int, payload: bytes) -> bool:
    writer.write(_head(status, len(payload)) + payload)
    await writer.drain()
    return True


async def serve(host: str, port: int, delay_ms: float, drip_ms: float) -> None:
    stub = Stub(delay_ms, drip_ms)
    server = await asyncio.start_server(stub.handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency of every completion")
    parser.add_argument("--drip-ms", type=float, default=200.0, help="gap between bytes in `drip` mode")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.delay_ms, args.drip_ms))


if __name__ == "__main__":
    main()
