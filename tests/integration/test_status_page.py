"""The status page in headless Chromium (Debian's chromium package) against a real gateway:
after a few requests, the members table renders live data from /status.json. The gateway has an
operators' port (serve --ops-port): the page and its data are served there, not on the API's port."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.load import gateway_process, stub_config, stub_server

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",  # lets the page's fetch() finish before the DOM is dumped
]


class _Rows(HTMLParser):
    """Cells of each ``<tr data-member=...>`` and ``<tr data-request=...>``."""

    def __init__(self) -> None:
        super().__init__()
        self.members: dict[str, list[str]] = {}
        self.requests: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-member" in a:
            self._row = self.members.setdefault(str(a["data-member"]), [])
        elif tag == "tr" and "data-request" in a:
            self._row = []
            self.requests.append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: apt-get install chromium (done by .ci/run)")
    return exe


def test_status_page_renders_live_member_data(tiny_models: Path, tmp_path: Path) -> None:
    exe = chromium()
    with stub_server(delay_ms=10) as stub:
        cfg = stub_config(stub, ["ok", "ok", "err500"], ranker="pairrm", fuse_top_k=1, deadline_s=10)
        cfg["rankers"] = {"pairrm": {"checkpoint": str(tiny_models / "pairrm"), "device": "cpu"}}
        cfg["store"] = {"url": f"sqlite:///{tmp_path / 'store.db'}"}
        cfg["limits"] = {"per_key": {"requests_per_minute": 100}}  # the open API's callers, as one key
        with gateway_process(cfg, tmp_path, ops_port=True) as gw:
            assert gw.ops_url is not None
            for i in range(5):
                resp = httpx.post(gw.url + "/generate", json={"prompt": f"status page question {i}"}, timeout=30)
                assert resp.status_code == 200, resp.text
            # Each port serves its own: the API and the probes on one; metrics, status and the probes on the other.
            for path in ("/", "/status.json", "/metrics"):
                assert httpx.get(gw.url + path).status_code == 404, path
            assert httpx.post(gw.ops_url + "/generate", json={"prompt": "x"}).status_code == 404
            assert httpx.get(gw.ops_url + "/metrics").text.count("gateway_requests_total") > 0
            for base in (gw.url, gw.ops_url):
                assert httpx.get(base + "/ready").status_code == 200, base
            profile = tmp_path / "chromium-profile"
            args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
            dom = subprocess.run(
                [*args, "--dump-dom", gw.ops_url + "/"], capture_output=True, text=True, timeout=120, check=True
            ).stdout
            shot = tmp_path / "status.png"
            subprocess.run(
                [*args, f"--screenshot={shot}", "--window-size=1280,900", gw.ops_url + "/"],
                capture_output=True,
                timeout=120,
                check=True,
            )
    rows = _Rows()
    rows.feed(dom)
    assert set(rows.members) == {"m0-ok", "m1-ok", "m2-err500"}, dom[:2000]
    ok = rows.members["m0-ok"]
    # member, health, circuit, p50 ms, win rate, selection share, calls, errors
    assert ok[1] == "up" and ok[2] == "closed"
    assert re.fullmatch(r"\d+(\.\d)?", ok[3]), ok  # a measured p50
    assert ok[6] == "5" and ok[7] == "0"
    wins = [float(rows.members[m][4].rstrip("%")) for m in ("m0-ok", "m1-ok")]
    assert sum(wins) == pytest.approx(100.0)  # one of the two wins each request
    bad = rows.members["m2-err500"]
    assert bad[4] == "–" and int(bad[7]) == 5  # never a candidate; 5 failed calls
    assert len(rows.requests) == 5 and all("m2-err500" in r[3] for r in rows.requests)
    assert shot.stat().st_size > 10_000
    store = re.search(r'<div class="meta" id="store">([^<]*)</div>', dom)
    assert store is not None and re.search(r": up · 5 written · 0 queued · 0 dropped$", store.group(1)), dom[:3000]
    limits = re.search(r'<div class="meta" id="limits">([^<]*)</div>', dom)
    assert limits is not None, dom[:3000]
    assert re.fullmatch(
        r"per-key limits counted in this process · anonymous: 5 requests, 0 in flight, 0 limited, \d+ member tokens",
        limits.group(1),
    ), limits.group(1)
