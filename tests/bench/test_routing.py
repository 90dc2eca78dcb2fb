"""bench.routing's figures from a result (the served run is `make quality`'s): the methods, the
goal's verdict, the section and the chart."""

from pathlib import Path
from typing import Any

from bench import routing


def row(em: float, calls: float, p50: float | None = 100.0) -> dict[str, Any]:
    return {"answered": 4, "errors": 0, "exact_match": em, "by_skill": {"add": em}, "calls": calls, "p50_ms": p50}


def result(rows: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": "2026-12-07", "commit": "abc", "machine": {"cpu": "cpu", "cores": 2}, "concurrency": 8,
        "feed": {"ensemble": "with-adapters", "seed": 600, "prompts": 4},
        "suite": {"seed": 1, "per_skill": 1, "prompts": 4},
        "router": {
            "kind": "knn",
            "heldout": {"knn": {"top1": 0.9, "random": 0.2}, "linear": {"top1": 0.8, "random": 0.2}},
        },
        "ensembles": {"demo": {"members": 5, "rows": rows, "goal": routing.goal(rows)}},
    }  # fmt: skip


def test_variants_route_cascade_and_the_random_baseline() -> None:
    v = routing.variants({"members": ["a", "b", "c"], "ranker": "pairrm"})
    assert list(v) == ["route m=1", "route m=2", "route m=3", "cascade 2, margin 0.5", "cascade 2, margin 1",
                       "cascade 2, margin 2", "random m=2"]  # fmt: skip
    assert v["route m=2"]["route"] == {"members": 2} and v["route m=2"]["router"] == "store-router"
    assert v["cascade 2, margin 1"]["cascade"] == {"members": 2, "margin": 1.0}
    assert v["random m=2"]["router"] == "random"


def test_the_goal_takes_the_best_method_within_the_call_budget() -> None:
    rows = {
        "every member": row(90.0, 5.0),
        "oracle router": row(99.0, 1.0, None),  # not served: never the verdict
        "route m=1": row(88.5, 1.0),
        "route m=3": row(95.0, 3.0),  # over 40% of the calls
        "random m=2": row(89.0, 2.0),  # the baseline: never the verdict
    }
    g = routing.goal(rows)
    assert g["method"] == "route m=1" and g["calls_share"] == 0.2 and g["met"] is True  # 88.5 / 90 = 0.983
    rows["route m=1"] = row(88.0, 1.0)  # 0.978
    assert routing.goal(rows)["met"] is False


def test_section_and_chart(tmp_path: Path) -> None:
    rows = {"every member": row(90.0, 5.0), "oracle router": row(99.0, 1.0, None), "route m=1": row(89.0, 1.0)}
    text = "\n".join(routing.section(result(rows)))
    assert "| route m=1 | 89.0 | 89.0 | 1.00 | 20% | 100 |" in text
    assert "| oracle router | 99.0 | 99.0 | 1.00 | 20% | - |" in text
    assert "knn 90.0%, linear 80.0%" in text and "(goal 98%: met)" in text
    routing.chart(result(rows), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert routing.section(None) == []
