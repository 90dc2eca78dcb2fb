"""``ensemble-gateway serve`` with the member HTTP client on httpx's aiohttp transport
(httpx-aiohttp), for the benchmark's comparison: ``python -m bench.serve_variant serve ...``.

Only the client factory changes; the gateway code is the shipped one.
"""

from __future__ import annotations

import sys

import httpx


def aiohttp_client(max_connections: int) -> httpx.AsyncClient:
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30.0
    )
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=httpx.Timeout(60.0, connect=5.0))


def main() -> int:
    import service.members
    import service.runtime
    from service.cli import main as cli_main

    service.members.make_http_client = aiohttp_client
    service.runtime.make_http_client = aiohttp_client  # type: ignore[attr-defined]
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
