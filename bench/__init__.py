"""Side-by-side benchmark of the gateway against llm-blender (`make bench`, `python -m bench`).

Parts: ``ranker`` (PairRM), ``fuser`` (GenFuser), ``e2e`` (members + rank + fuse) and
``gateway`` (HTTP overhead against a bare fan-out). Contenders alternate, figures are medians over
repeats, and everything is measured in one run on one machine; ``report`` writes
``bench/results/latest.json`` and the table in ``docs/PERFORMANCE.md``.
"""
