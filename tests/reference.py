"""llm-blender itself, run the way llm-blender runs: the reference for parity tests.

Ranking: llm-blender's ``tokenize_pair`` and ``DebertaV2PairRM`` on one pair at a time (its
"full" mode: every ordered pair), then its own ``get_scores_from_cmps`` and
``get_ranks_from_scores``. Fusion: ``Blender.fuse`` on a ``Blender`` that loaded the fuser.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import numpy as np

from service.models.compat import import_llm_blender, import_pairrm


@lru_cache(maxsize=4)
def _pairrm(checkpoint: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    model = import_pairrm().from_pretrained(checkpoint).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def reference_matrix(checkpoint: str, source: str, candidates: list[str]) -> np.ndarray:
    import torch

    utils = import_llm_blender("llm_blender.blender.blender_utils")
    model, tok = _pairrm(checkpoint)
    n = len(candidates)
    matrix = np.zeros((n, n), dtype=np.float32)
    with torch.no_grad():
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                enc = utils.tokenize_pair(tok, [source], [candidates[i]], [candidates[j]], 1224, 412)
                matrix[i, j] = model(**enc).logits.item()
    return matrix


def reference_rank(checkpoint: str, source: str, candidates: list[str], policy: str) -> tuple[list[float], list[int]]:
    gpt = import_llm_blender("llm_blender.gpt_eval.utils")
    matrix = reference_matrix(checkpoint, source, candidates)
    scores = gpt.get_scores_from_cmps(matrix[None], policy=policy)[0]
    ranks = gpt.get_ranks_from_scores(scores)
    return [float(s) for s in scores], [int(r) for r in ranks]


@lru_cache(maxsize=4)
def _blender(checkpoint: str) -> Any:
    blender_mod = import_llm_blender("llm_blender.blender.blender")
    blender = blender_mod.Blender()
    blender.blender_config.use_tqdm = False
    blender.loadfuser(checkpoint, device="cpu", torch_dtype="float32")
    return blender


def reference_fuse(checkpoint: str, instruction: str, input_text: str, candidates: list[str]) -> str:
    out = _blender(checkpoint).fuse([input_text], [copy.deepcopy(candidates)], instructions=[instruction], batch_size=1)
    return str(out[0])
