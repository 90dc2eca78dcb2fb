"""The store through the API, fake members behind the real app and a real SQLite file: every
answer recorded (plain and streamed, every API), feedback checked against the answer's evidence,
stored responses read, deleted and continued, each only by the key that made it."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789"}


def make(tmp: Path, store: str = "{}", *, keys: bool = False, extra: str = "") -> tuple[TestClient, list[FakeMember]]:
    members = [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]
    parts = Components(
        members={m.name: m for m in members}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )
    text = FAKE_CONFIG.replace("deadline_s: 1", "deadline_s: 30") + f"cache_dir: {tmp}\nstore: {store}\n" + extra
    if keys:
        text += f"auth: {{api_keys: [{KEYS['alice']}, {KEYS['bob']}], api_keys_env: null}}\n"
    return TestClient(create_app(fake_config(text), parts=parts), raise_server_exceptions=False), members


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def rows(db: Path, table: str) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]


def stored(db: Path, answer_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The answer's row, once the writer has written it (it is written off the request path)."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        found = [r for r in rows(db, "answers") if r["id"] == answer_id] if db.exists() else []
        if found:
            return {k: json.loads(v) if k in JSON_COLUMNS and v is not None else v for k, v in found[0].items()}
        time.sleep(0.05)
    raise AssertionError(f"answer {answer_id} was not written")


JSON_COLUMNS = {
    "metadata",
    "input",
    "fusion",
    "candidates",
    "failed",
    "degraded_reasons",
    "timings_ms",
    "usage",
    "request",
}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[TestClient]:
    client, _ = make(tmp_path)
    with client:
        yield client


def test_every_api_records_its_answers_with_their_evidence(tmp_path: Path) -> None:
    client, _ = make(tmp_path)
    db = tmp_path / "store.db"
    with client:
        gen = client.post("/generate", json={"prompt": "q", "metadata": {"user": "u1"}}).json()
        chat = client.post(
            "/v1/chat/completions", json={"model": "main", "messages": [{"role": "user", "content": "hi"}]}
        )
        comp = client.post("/v1/completions", json={"model": "plain", "prompt": "p", "stream": True})
        resp = client.post("/v1/responses", json={"model": "main", "input": "r", "instructions": "be brief"}).json()
        assert chat.status_code == 200 and comp.status_code == 200
        g = stored(db, gen["id"].removeprefix("gen-"))
        c = stored(db, chat.json()["id"].removeprefix("chatcmpl-"))
        streamed = next(json.loads(line[6:]) for line in comp.text.splitlines() if line.startswith("data: {"))
        s = stored(db, streamed["id"].removeprefix("cmpl-"))
        r = stored(db, resp["id"].removeprefix("resp_"))
    assert (g["api"], c["api"], s["api"], r["api"]) == ("generate", "chat", "completions", "responses")
    assert g["ensemble"] == "main" and g["metadata"] == {"user": "u1"} and g["key_id"] is None
    assert g["input"] == {"prompt": "q", "instruction": "", "input_text": "q"}
    assert g["output"] == gen["output"] and bool(g["fused"]) is True
    assert [x["member"] for x in g["candidates"]] == ["b", "c", "a"]  # the length ranker's order
    assert {x["text"] for x in g["candidates"]} == {"aa", "bbbb", "ccc"}
    assert all(x["score"] is not None and x["rank"] >= 1 for x in g["candidates"])
    assert all(x["completion_tokens"] >= 1 and x["latency_ms"] >= 0 for x in g["candidates"])
    assert g["fusion"]["selected"] == ["b", "c"] and g["fusion"]["not_fused"] is None
    assert g["usage"]["members"]["a"]["completion_tokens"] >= 1 and g["timings_ms"]["total"] > 0
    assert len(g["config_digest"]) == 16 and g["config_digest"] == c["config_digest"]
    assert c["input"]["messages"] == [{"role": "user", "content": "hi"}]
    assert s["ensemble"] == "plain" and s["fusion"]["not_fused"] == "no_fuser"
    assert r["input"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert r["request"]["instructions"] == "be brief" and bool(r["retrievable"]) is True


def test_feedback_is_kept_beside_its_answer(tmp_path: Path) -> None:
    client, _ = make(tmp_path)
    with client:
        answer = client.post("/generate", json={"prompt": "q"}).json()
        body = {"id": answer["id"], "preferred": "c", "rejected": ["a"], "reference": "ccc", "rating": 0.5}
        r = client.post("/v1/feedback", json=body)
        again = client.post("/v1/feedback", json={"id": answer["id"].removeprefix("gen-"), "comment": "ok"})
    assert r.status_code == 200, r.text
    ack = r.json()
    assert ack["object"] == "feedback" and ack["id"].startswith("fb_") and ack["answer_id"] == answer["id"]
    assert again.status_code == 200
    kept = sorted(rows(tmp_path / "store.db", "feedback"), key=lambda f: f["created_at"])
    assert [f["answer_id"] for f in kept] == [answer["id"].removeprefix("gen-")] * 2
    assert kept[0]["preferred"] == "c" and json.loads(kept[0]["rejected"]) == ["a"]
    assert kept[0]["reference"] == "ccc" and kept[0]["rating"] == 0.5 and kept[1]["comment"] == "ok"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"id": "gen-0000"}, 400, None),  # says nothing
        ({"id": "gen-00000000000000000000000000000000", "rating": 1}, 404, "id"),
        ({"id": "ANSWER", "preferred": "zz"}, 400, "preferred"),
        ({"id": "ANSWER", "rejected": ["a", "zz"]}, 400, "rejected.1"),
        ({"id": "ANSWER", "preferred": "a", "rejected": ["a"]}, 400, None),
        ({"id": "ANSWER", "rating": 2}, 400, "rating"),
        ({"id": "ANSWER", "reference": "x" * 20_001}, 400, "reference"),
        ({"id": "ANSWER", "rating": 1, "extra": 1}, 400, "extra"),
    ],
)
def test_bad_feedback_is_refused_by_field_and_nothing_is_kept(
    gateway: TestClient, tmp_path: Path, body: dict[str, Any], status: int, param: str | None
) -> None:
    answer = gateway.post("/generate", json={"prompt": "q"}).json()
    body = {k: answer["id"] if v == "ANSWER" else v for k, v in body.items()}
    r = gateway.post("/v1/feedback", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert rows(tmp_path / "store.db", "feedback") == []


def test_feedback_needs_the_key_that_made_the_answer(tmp_path: Path) -> None:
    client, _ = make(tmp_path, keys=True)
    with client:
        answer = client.post("/generate", json={"prompt": "q"}, headers=auth("alice")).json()
        bob = client.post("/v1/feedback", json={"id": answer["id"], "rating": -1}, headers=auth("bob"))
        nobody = client.post("/v1/feedback", json={"id": answer["id"], "rating": -1})
        alice = client.post("/v1/feedback", json={"id": answer["id"], "rating": 1}, headers=auth("alice"))
    assert (bob.status_code, nobody.status_code, alice.status_code) == (404, 401, 200)
    kept = rows(tmp_path / "store.db", "feedback")
    assert len(kept) == 1 and kept[0]["rating"] == 1 and kept[0]["key_id"].startswith("key-")
    assert KEYS["alice"] not in json.dumps(rows(tmp_path / "store.db", "answers"))


def test_stored_responses_are_read_continued_and_deleted_by_their_key(tmp_path: Path) -> None:
    client, members = make(tmp_path, keys=True)
    with client:
        first = client.post(
            "/v1/responses",
            json={"model": "main", "input": "q1", "instructions": "sys", "metadata": {"t": "1"}},
            headers=auth("alice"),
        ).json()
        assert first["store"] is True
        read = client.get(f"/v1/responses/{first['id']}", headers=auth("alice"))
        assert read.status_code == 200, read.text
        got = read.json()
        assert (got["id"], got["output"], got["usage"]) == (first["id"], first["output"], first["usage"])
        assert got["instructions"] == "sys" and got["metadata"] == {"t": "1"} and got["status"] == "completed"
        assert client.get(f"/v1/responses/{first['id']}", headers=auth("bob")).status_code == 404
        nxt = client.post(
            "/v1/responses",
            json={"model": "main", "input": "q2", "previous_response_id": first["id"]},
            headers=auth("alice"),
        )
        assert nxt.status_code == 200, nxt.text
        assert nxt.json()["previous_response_id"] == first["id"]
        seen = members[0].requests[-1].messages
        assert [(m["role"], m["content"]) for m in seen or []] == [
            ("user", "q1"),
            ("assistant", first["output"][0]["content"][0]["text"]),
            ("user", "q2"),
        ]  # the old instructions are not carried over
        theirs = client.post(
            "/v1/responses",
            json={"model": "main", "input": "x", "previous_response_id": first["id"]},
            headers=auth("bob"),
        )
        assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "previous_response_id"
        assert client.delete(f"/v1/responses/{first['id']}", headers=auth("bob")).status_code == 404
        gone = client.delete(f"/v1/responses/{first['id']}", headers=auth("alice"))
        assert gone.status_code == 200 and gone.json() == {"id": first["id"], "object": "response", "deleted": True}
        assert client.get(f"/v1/responses/{first['id']}", headers=auth("alice")).status_code == 404
        assert client.delete(f"/v1/responses/{first['id']}", headers=auth("alice")).status_code == 404


def test_a_response_not_to_be_stored_cannot_be_read(gateway: TestClient) -> None:
    r = gateway.post("/v1/responses", json={"model": "main", "input": "q", "store": False}).json()
    assert r["store"] is False
    assert gateway.get(f"/v1/responses/{r['id']}").status_code == 404
    assert gateway.get("/v1/responses/resp_nope").status_code == 404


def test_hashed_inputs_keep_no_text_and_cannot_be_continued(tmp_path: Path) -> None:
    client, _ = make(tmp_path, "{record_inputs: false}")
    with client:
        r = client.post("/v1/responses", json={"model": "main", "input": "secret words"}).json()
        row = stored(tmp_path / "store.db", r["id"].removeprefix("resp_"))
        cont = client.post("/v1/responses", json={"model": "main", "input": "x", "previous_response_id": r["id"]})
    assert "secret words" not in json.dumps(row["input"])
    assert set(row["input"]["messages"][0]["content"]) == {"sha256"} and bool(row["inputs_hashed"]) is True
    assert cont.status_code == 400 and cont.json()["error"]["param"] == "previous_response_id"


def test_an_ensemble_that_opts_out_is_not_recorded(tmp_path: Path) -> None:
    cfg = FAKE_CONFIG.replace("plain: {members: [a, b], top_k: 1}", "plain: {members: [a, b], top_k: 1, store: false}")
    members = [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]
    parts = Components(
        members={m.name: m for m in members}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )
    app = create_app(
        fake_config(cfg.replace("deadline_s: 1", "deadline_s: 30") + f"cache_dir: {tmp_path}\nstore: {{}}\n"),
        parts=parts,
    )
    with TestClient(app) as c:
        quiet = c.post("/generate", json={"prompt": "q", "ensemble": "plain"}).json()
        loud = c.post("/generate", json={"prompt": "q"}).json()
        assert c.post("/v1/feedback", json={"id": quiet["id"], "rating": 1}).status_code == 404
        assert c.post("/v1/feedback", json={"id": loud["id"], "rating": 1}).status_code == 200


def test_without_a_store_feedback_and_reads_say_so(tmp_path: Path) -> None:
    members = [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]
    parts = Components(
        members={m.name: m for m in members}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )
    with TestClient(create_app(fake_config(FAKE_CONFIG), parts=parts)) as c:
        r = c.post("/v1/feedback", json={"id": "gen-1", "rating": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "store_disabled"
        assert c.get("/v1/responses/resp_1").status_code == 400
        assert c.get("/status.json").json()["store"] is None


def test_the_status_page_and_metrics_show_the_store(gateway: TestClient) -> None:
    gateway.post("/generate", json={"prompt": "q"})
    answer = gateway.post("/generate", json={"prompt": "q"}).json()
    assert gateway.post("/v1/feedback", json={"id": answer["id"], "rating": 1}).status_code == 200
    store = gateway.get("/status.json").json()["store"]
    assert store["up"] is True and store["written"] == 2 and store["dropped"] == {}
    text = gateway.get("/metrics").text
    assert "gateway_store_records_written_total 2.0" in text
    assert 'gateway_feedback_received_total{ensemble="main"} 1.0' in text


def test_hostile_feedback_text_is_kept_verbatim_or_refused_by_field(gateway: TestClient, tmp_path: Path) -> None:
    answer = gateway.post("/generate", json={"prompt": "q"}).json()
    hostile = "'); DROP TABLE answers; -- \u202e ünïcödé 🙂 <script>alert(1)</script>"
    ok = gateway.post("/v1/feedback", json={"id": answer["id"], "comment": hostile, "reference": "%s %%"})
    nul = gateway.post("/v1/feedback", json={"id": answer["id"], "comment": "a\x00b"})
    assert ok.status_code == 200 and nul.status_code == 400 and nul.json()["error"]["param"] == "comment"
    kept = rows(tmp_path / "store.db", "feedback")
    assert [(f["comment"], f["reference"]) for f in kept] == [(hostile, "%s %%")]
    assert len(rows(tmp_path / "store.db", "answers")) == 1


def test_a_feedback_body_over_the_size_limit_is_413_and_nothing_is_kept(gateway: TestClient, tmp_path: Path) -> None:
    answer = gateway.post("/generate", json={"prompt": "q"}).json()
    r = gateway.post("/v1/feedback", json={"id": answer["id"], "comment": "x" * 1_100_000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    assert rows(tmp_path / "store.db", "feedback") == []
