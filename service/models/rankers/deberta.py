"""A packed, inference-only forward through a DeBERTa-v2/v3 encoder: PairRM's backbone.

Same weights and the same arithmetic as transformers' ``DebertaV2Model`` (the same floats, in the
same order), arranged so that less is computed and a CPU spends its time in large products:

- every dense layer (Q/K/V, attention output, feed-forward) and every LayerNorm runs on the
  tokens of all sequences packed into one [tokens, hidden] matrix: no padding is computed there;
- attention runs per group of sequences of similar length, each padded only to its own longest
  (the groups minimise padded attention work plus a per-group overhead);
- the relative-position projections cover only the distances that occur in a group: the
  reference projects all 2 × ``position_buckets`` rows, copies them for every sequence, multiplies
  them with every query and key, and then gathers the few it needs.

``supports(config)`` says whether a checkpoint uses only what this forward implements (PairRM and
DeBERTa-v3 do); otherwise callers keep transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A group's fixed cost in the units of padded attention work (sequences x length²): the kernel
# launches and small copies that each group adds, per layer.
GROUP_OVERHEAD = 64 * 64 * 4


def supports(config: Any) -> bool:
    return bool(
        getattr(config, "relative_attention", False)
        and getattr(config, "share_att_key", False)
        and set(getattr(config, "pos_att_type", None) or []) == {"c2p", "p2c"}
        and not getattr(config, "position_biased_input", True)
        and getattr(config, "type_vocab_size", 0) == 0
        and getattr(config, "embedding_size", config.hidden_size) == config.hidden_size
        and getattr(config, "conv_kernel_size", 0) == 0
        and getattr(config, "hidden_act", "gelu") == "gelu"
        and getattr(config, "position_buckets", -1) > 0
    )


def attention_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD) -> list[tuple[int, int]]:
    """Split lengths sorted ascending into contiguous groups [start, end) minimising
    sum(size x longest²) + overhead per group (dynamic programming over the split points)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + (end - start) * lengths[end - 1] ** 2 + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


@dataclass
class _Group:
    """Sequences that share one padded attention view: tokens [first, last) of the packed matrix."""

    first: int
    last: int
    batch: int
    longest: int
    slots: Any  # each token's row in the padded [batch * longest] view
    key_pad: Any  # [batch, 1, 1, longest], true on padding
    padded: bool
    c2p_idx: Any
    p2c_idx: Any
    lo: int  # the relative-embedding rows this group needs: [lo, hi]
    hi: int


class PackedDeberta:
    """``encode(seqs)`` → (last hidden states packed [tokens, hidden], each sequence's first row)."""

    def __init__(self, model: Any):
        from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

        if not supports(model.config):
            raise ValueError("this DeBERTa configuration needs transformers' own forward")
        self.model = model
        self._build_relative_position = hf.build_relative_position
        config = model.config
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.span = config.position_buckets  # the attention's att_span (pos_ebd_size)
        self.max_relative_positions = model.encoder.max_relative_positions
        self._position_cache: dict[tuple[int, str], tuple[Any, Any, int, int]] = {}

    def encode(self, seqs: list[list[int]]) -> tuple[Any, list[int]]:
        import torch

        model = self.model
        device = model.embeddings.word_embeddings.weight.device
        # Tokens are packed shortest sequence first, so that each attention group is one slice.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        lengths = [len(seqs[i]) for i in order]
        starts = [0] * len(seqs)
        offset = 0
        for i in order:
            starts[i] = offset
            offset += len(seqs[i])
        ids = torch.tensor([t for i in order for t in seqs[i]], dtype=torch.long, device=device)
        groups = [self._group(lengths, a, b, device) for a, b in attention_groups(lengths)]

        emb = model.embeddings
        x = emb.LayerNorm(emb.word_embeddings(ids))
        encoder = model.encoder
        rel_embeddings = encoder.get_rel_embedding()
        lo, hi = min(g.lo for g in groups), max(g.hi for g in groups)
        rel_rows = rel_embeddings[lo : hi + 1]
        neg = torch.finfo(x.dtype).min
        scale = torch.sqrt(torch.tensor(self.head_dim * 3, dtype=torch.float)).to(x.dtype)

        for layer in encoder.layer:
            att = layer.attention.self
            q_all, k_all, v_all = att.query_proj(x), att.key_proj(x), att.value_proj(x)
            pos_q_all = self._pos(att.query_proj(rel_rows))  # [heads, head_dim, R]
            pos_k_all = self._pos(att.key_proj(rel_rows))
            ctx = torch.empty_like(q_all)
            for g in groups:
                q, k, v = (self._heads_of(t[g.first : g.last], g) for t in (q_all, k_all, v_all))
                pos_q = pos_q_all[:, :, g.lo - lo : g.hi - lo + 1]
                pos_k = pos_k_all[:, :, g.lo - lo : g.hi - lo + 1]
                # The reference's order of operations, in place: the results are the same floats.
                c2p = torch.gather(_per_head_matmul(q, pos_k), -1, g.c2p_idx).div_(scale)
                p2c = torch.gather(_per_head_matmul(k, pos_q), -1, g.p2c_idx).div_(scale).transpose(-1, -2)
                scores = torch.matmul(q, k.transpose(-1, -2) / scale).add_(c2p.add_(p2c))
                if g.padded:
                    scores.masked_fill_(g.key_pad, neg)
                out = torch.matmul(torch.softmax(scores, dim=-1), v)
                flat = out.transpose(1, 2).reshape(g.batch * g.longest, self.heads * self.head_dim)
                torch.index_select(flat, 0, g.slots, out=ctx[g.first : g.last])
            out_layer = layer.attention.output
            x = out_layer.LayerNorm(out_layer.dense(ctx) + x)
            ffn = layer.output
            x = ffn.LayerNorm(ffn.dense(layer.intermediate(x)) + x)
        return x, starts

    def _group(self, lengths: list[int], a: int, b: int, device: Any) -> _Group:
        import torch

        sizes = lengths[a:b]
        batch, longest = len(sizes), max(sizes)
        slots = torch.cat([torch.arange(n, device=device) + r * longest for r, n in enumerate(sizes)])
        key_ok = torch.arange(longest, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
        c2p_pos, p2c_pos, lo, hi = self._positions(longest, device)
        shape = (batch, self.heads, longest, longest)
        first = sum(lengths[:a])
        return _Group(
            first=first,
            last=first + sum(sizes),
            batch=batch,
            longest=longest,
            slots=slots,
            key_pad=~key_ok[:, None, None, :],
            padded=min(sizes) < longest,
            c2p_idx=c2p_pos.expand(shape),
            p2c_idx=p2c_pos.expand(shape),
            lo=lo,
            hi=hi,
        )

    def _positions(self, longest: int, device: Any) -> tuple[Any, Any, int, int]:
        """The reference's c2p and p2c gather indices for a length, relative to the first
        relative-embedding row they use (lo), and the last one (hi); cached per length."""
        import torch

        key = (longest, str(device))
        if key not in self._position_cache:
            probe = torch.empty(longest, 0, device=device)
            rel = self._build_relative_position(
                probe, probe, bucket_size=self.span, max_position=self.max_relative_positions
            )[0]
            c2p_pos = torch.clamp(rel + self.span, 0, self.span * 2 - 1)
            p2c_pos = torch.clamp(-rel + self.span, 0, self.span * 2 - 1)
            lo = int(torch.minimum(c2p_pos.min(), p2c_pos.min()))
            hi = int(torch.maximum(c2p_pos.max(), p2c_pos.max()))
            if len(self._position_cache) >= 4096:
                self._position_cache.clear()
            self._position_cache[key] = (c2p_pos - lo, p2c_pos - lo, lo, hi)
        return self._position_cache[key]

    def _heads_of(self, packed: Any, g: _Group) -> Any:
        """Packed [tokens, hidden] rows → the group's padded [batch, heads, longest, head_dim]."""
        padded = packed.new_zeros(g.batch * g.longest, packed.shape[-1])
        padded.index_copy_(0, g.slots, packed)
        return padded.view(g.batch, g.longest, self.heads, self.head_dim).transpose(1, 2)

    def _pos(self, projected: Any) -> Any:
        rows = projected.shape[0]
        return projected.view(rows, self.heads, self.head_dim).permute(1, 2, 0)


def _per_head_matmul(x: Any, pos: Any) -> Any:
    """[batch, heads, L, d] @ [heads, d, R] → [batch, heads, L, R], one product per head over all
    sequences (no copy of ``pos`` per sequence)."""
    batch, heads, length, dim = x.shape
    flat = x.transpose(0, 1).reshape(heads, batch * length, dim)
    return (flat @ pos).view(heads, batch, length, -1).transpose(0, 1)
