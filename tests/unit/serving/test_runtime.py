"""Reload without a restart: validated first, swapped at once, in-flight requests unharmed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.config import parse_config
from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FakeMember, JoinFuser, LengthRanker

BASE = """
auth: {{api_keys_env: null, admin_key_env: TEST_ADMIN}}
members:
  - {{name: a, endpoint: "http://127.0.0.1:9/v1", model: m, sampling: {{max_tokens: {tokens}}}}}
  - {{name: b, endpoint: "http://127.0.0.1:9/v1", model: m}}
  - {{name: c, endpoint: "http://127.0.0.1:9/v1", model: m}}
  - {{name: slow, endpoint: "http://127.0.0.1:9/v1", model: m}}
rankers: {{length: {{checkpoint: unused}}}}
fusers: {{join: {{checkpoint: unused}}}}
ensembles:
  main: {{members: [{main}], ranker: length, fuser: join, fuse_top_k: 2}}
{extra}
"""
ADMIN = {"Authorization": "Bearer secret"}


def version(tokens: int = 8, main: str = "a, b, c", extra: str = "") -> str:
    return BASE.format(tokens=tokens, main=main, extra=extra)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_ADMIN", "secret")
    path = tmp_path / "gw.yaml"
    path.write_text(version(extra="  old-only: {members: [slow]}"))
    members = [
        FakeMember("a", "aa"),
        FakeMember("b", "bbbb"),
        FakeMember("c", "ccc"),
        FakeMember("slow", "zz", delay=0.5),
    ]
    parts = Components(
        members={m.name: m for m in members}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )
    app = create_app(parse_config(path.read_text()), parts=parts, config_path=path)
    return app, path, members


async def test_reload_while_requests_run(setup) -> None:  # type: ignore[no-untyped-def]
    app, path, members = setup
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            stop = asyncio.Event()
            statuses: list[int] = []

            async def traffic() -> None:
                while not stop.is_set():
                    r = await client.post("/generate", json={"prompt": "q"})
                    statuses.append(r.status_code)

            async def reloads() -> list[int]:
                codes = []
                for v in [
                    version(tokens=16),
                    version(main="a, b"),
                    version(main="a, b, nobody"),  # invalid: the old configuration keeps serving
                    version(main="a, b, c", extra="  second: {members: [b, c]}"),
                    version(tokens=4),
                ] * 4:
                    path.write_text(v)
                    codes.append((await client.post("/admin/reload", headers=ADMIN)).status_code)
                    await asyncio.sleep(0.01)
                return codes

            workers = [asyncio.create_task(traffic()) for _ in range(8)]
            codes = await reloads()
            stop.set()
            await asyncio.gather(*workers)
    assert codes == [200, 200, 400, 200, 200] * 4
    assert len(statuses) > 20 and set(statuses) == {200}, statuses
    assert members[0].requests[-1].max_tokens == 4, "the last configuration is the one serving"


async def test_invalid_config_keeps_the_old_one_and_says_why(setup) -> None:  # type: ignore[no-untyped-def]
    app, path, _ = setup
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        path.write_text(version(main="a, zz"))
        r = await client.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "config_error" and "ensembles.main.members" in err["message"]
        path.write_text("members: [")
        assert (await client.post("/admin/reload", headers=ADMIN)).status_code == 400
        r = await client.post("/generate", json={"prompt": "q", "ensemble": "old-only"})
        assert r.status_code == 200


async def test_in_flight_request_finishes_on_its_configuration(setup) -> None:  # type: ignore[no-untyped-def]
    app, path, members = setup
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        slow = asyncio.create_task(client.post("/generate", json={"prompt": "q", "ensemble": "old-only"}))
        async with asyncio.timeout(5):
            while not members[3].requests:  # until the slow member has the request
                await asyncio.sleep(0)
        path.write_text(version())  # drops the ensemble the slow request runs on
        r = await client.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["changes"]["ensembles"] == ["main"]
        assert (await slow).status_code == 200
        gone = await client.post("/generate", json={"prompt": "q", "ensemble": "old-only"})
        assert gone.status_code == 404
        models = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["main"]
