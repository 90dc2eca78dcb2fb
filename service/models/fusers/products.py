"""Matrix products on a CPU: the skinny product a decoder step with a few rows is faster with,
and the probe that says whether rows can share a product exactly (batched fusion)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

SKINNY_ROWS = 16
SKINNY_MIN_WEIGHTS = 1 << 18  # smaller weights stay in cache, where the plain product is as fast


def skinny_linear(self: Any, x: Any) -> Any:
    """``nn.Linear.forward`` for a decoder step on a CPU: with a few rows (one per beam),
    weight @ xᵀ streams each weight matrix from memory once, where x @ weightᵀ (transformers'
    product) reaches about a third of the memory bandwidth; longer inputs take the usual path."""
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.weight.shape[0])


PROBE_ROWS = 48  # more rows than a shared step of max_batch_requests prompts usually has
PROBE_SLICES = ((0, 1), (0, 2), (0, 3), (0, 4), (4, 8), (0, 8), (8, 16), (0, 12), (16, 32), (0, 24), (3, 35))


def rows_invariant(weights: list[torch.Tensor]) -> bool:
    """Whether ``F.linear`` gives each row the same floats alone as among other rows, for every
    weight shape given: true of the CPU where batched fusion was built (every row count tried), not
    of another (an Intel Xeon with AVX-512-FP16, MKL 2024.2: 2 rows already differ from 1 in the
    last bits). Measured once per model, on random rows, with the model's own weights."""
    gen = torch.Generator().manual_seed(0)
    seen: set[tuple[int, ...]] = set()
    with torch.inference_mode():
        for w in weights:
            if tuple(w.shape) in seen:
                continue
            seen.add(tuple(w.shape))
            x = torch.randn(PROBE_ROWS, w.shape[1], generator=gen).to(w.dtype)
            full = F.linear(x, w)
            if not all(torch.equal(F.linear(x[a:b], w), full[a:b]) for a, b in PROBE_SLICES):
                return False
    return True
