"""``ensemble-gateway retrain-ranker``: the learning loop in one command, for a cron job. Pairs from
the store's feedback; the ranker the configuration serves fine-tuned on them; both compared on the
held-out pairs; only a better one is put in service, by pointing the configuration file at it and
asking the gateway to reload (``POST /admin/reload``). A reload that fails puts the file back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.config import load_config
from service.quality.learn import CHRF_THRESHOLD, gather_pairs, read_store
from service.quality.lm import FineTune
from service.quality.train_ranker import fine_tune_pairs


@dataclass(frozen=True)
class Loop:
    store: str  # the store's URL
    config: Path  # the gateway's configuration file
    ranker: str  # which of its rankers
    out: Path  # where new checkpoints go (one folder each)
    gateway: str | None = None  # the gateway's base URL; None: the file is changed, nobody is told
    admin_key: str | None = None
    ensemble: str | None = None  # only this ensemble's answers
    min_pairs: int = 20
    min_gain: float = 0.0  # held-out accuracy (0..1) the new ranker must gain beyond the one in service's
    heldout: float = 0.2
    chrf_threshold: float = CHRF_THRESHOLD


def point_config_at(config: Path, ranker: str, checkpoint: Path) -> str:
    """Rewrite the ranker's ``checkpoint`` in the file (only that value: comments and layout stay);
    the file's old text is returned. The value must appear once in the file."""
    text = config.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    value = ((raw.get("rankers") or {}).get(ranker) or {}).get("checkpoint")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{config}: rankers.{ranker}.checkpoint is not a path")
    if text.count(value) != 1:
        raise ValueError(f"{config}: rankers.{ranker}.checkpoint ({value}) appears {text.count(value)} times")
    tmp = config.with_name(config.name + ".tmp")
    tmp.write_text(text.replace(value, str(checkpoint.resolve())), encoding="utf-8")
    tmp.replace(config)
    return text


def reload(gateway: str, admin_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    r = httpx.post(f"{gateway.rstrip('/')}/admin/reload", headers=headers, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"the gateway refused the reload ({r.status_code}): {r.text[:500]}")
    result: dict[str, Any] = r.json()
    return result


def better_ranker(trained: dict[str, Any], min_gain: float) -> tuple[bool, str]:
    """Whether the new ranker is better, and why not. First on the held-out lists (is its first
    choice right, as the ensemble uses it), by more than ``min_gain``; where they tie, on the
    held-out pairs. Pairwise accuracy alone saturates: a ranker right on 99% of pairs can still
    put a wrong candidate first on one prompt in ten."""
    t1, acc = trained["heldout_top1"], trained["heldout_accuracy"]
    if t1["before"] is not None and t1["after"] is not None:
        if t1["after"] > t1["before"] + min_gain:
            return True, ""
        if t1["after"] < t1["before"] or min_gain > 0:
            return False, f"held-out first choices right {t1['after']:.3f} against {t1['before']:.3f}: not better"
    if acc["before"] is None or acc["after"] is None:
        return False, "no held-out pairs to compare on"
    if acc["after"] > acc["before"] + min_gain:
        return True, ""
    return (
        False,
        f"held-out pairwise accuracy {acc['after']:.3f} against {acc['before']:.3f}: not more than {min_gain} gained",
    )


def run(loop: Loop, fit: FineTune) -> dict[str, Any]:
    config = load_config(loop.config)
    if loop.ranker not in config.rankers:
        raise ValueError(f"{loop.config}: no ranker {loop.ranker!r} (it has {sorted(config.rankers)})")
    current = Path(config.local_ranker(loop.ranker).checkpoint)
    answered = asyncio.run(read_store(loop.store, loop.ensemble))
    gathered = gather_pairs(answered, loop.chrf_threshold)
    report: dict[str, Any] = {
        "answers_with_feedback": gathered.answers,
        "skipped_hashed": gathered.skipped_hashed,
        "pairs": len(gathered.pairs),
        "current": str(current),
        "swapped": False,
    }
    if len(gathered.pairs) < loop.min_pairs:
        report["why"] = f"{len(gathered.pairs)} pairs, fewer than {loop.min_pairs}"
        return report
    out = loop.out / f"{loop.ranker}-{time.strftime('%Y%m%d-%H%M%S')}"
    trained = fine_tune_pairs(current, gathered.pairs, out, fit, loop.heldout, gathered.choices)
    report["trained"] = trained
    better, why = better_ranker(trained, loop.min_gain)
    if not better:
        report["why"] = why
        return report
    old = point_config_at(loop.config, loop.ranker, out)
    if loop.gateway is not None:
        try:
            report["reload"] = reload(loop.gateway, loop.admin_key)
        except Exception:
            loop.config.write_text(old, encoding="utf-8")
            raise
    report.update(swapped=True, checkpoint=str(out.resolve()))
    return report
