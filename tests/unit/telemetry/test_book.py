"""The status page's book: per-member latency, errors, win rate and selection share; recent answers."""

from __future__ import annotations

from service.telemetry.book import RECENT, StatusBook


def answer(book: StatusBook, first: str, selected: list[str]) -> None:
    ranking = [{"member": m, "score": None, "rank": i + 1} for i, m in enumerate([first, *({"a", "b"} - {first})])]
    book.answer(
        id="x", ensemble="e", ranking=ranking, selected=selected, failed=[], fused=True, degraded=False, total_ms=1.0
    )


def test_latency_errors_and_shares() -> None:
    book = StatusBook()
    for ms in (10.0, 30.0, 20.0):
        book.call("a", ms)
    book.call("a", None, "timeout: slow")
    answer(book, "a", ["a"])
    answer(book, "b", ["b", "a"])
    a = book.member("e", "a")
    assert a["p50_ms"] == 20.0 and a["calls"] == 4 and a["errors"] == 1 and a["last_error"] == "timeout: slow"
    assert a["candidates"] == 2 and a["win_rate"] == 0.5 and a["selection_share"] == 1.0
    assert book.member("e", "nobody")["win_rate"] is None and book.answered == 2


def test_recent_is_bounded_newest_first() -> None:
    book = StatusBook()
    for i in range(RECENT + 5):
        book.answer(
            id=str(i), ensemble="e", ranking=[], selected=[], failed=[], fused=False, degraded=False, total_ms=0
        )
    assert len(book.recent) == RECENT and book.recent[0]["id"] == str(RECENT + 4)
