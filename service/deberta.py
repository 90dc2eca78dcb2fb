"""A packed, inference-only forward through a DeBERTa-v2/v3 encoder: PairRM's backbone.

Same weights and the same arithmetic as transformers' ``DebertaV2Model`` (results agree to float
rounding), arranged so that a CPU spends its time in large matrix products:

- every dense layer (Q/K/V, attention output, feed-forward) and every LayerNorm runs on the
  tokens of all sequences packed into one [tokens, hidden] matrix: no padding is computed there;
- attention runs on a padded [batch, heads, longest, head_dim] view of the group, in the
  reference's order of operations (scaled by sqrt(3 * head_dim): content and two relative terms);
- the relative-position projections cover only the distances that occur in the group: the
  reference projects all 2 × ``position_buckets`` rows, copies them for every sequence, multiplies
  them with every query and key, and then gathers the few it needs.

``supports(config)`` says whether a checkpoint uses only what this forward implements (PairRM and
DeBERTa-v3 do); otherwise callers keep transformers' forward.
"""

from __future__ import annotations

from typing import Any


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


class PackedDeberta:
    """``encode(seqs)`` → the last hidden states of every token, packed [sum(len), hidden]."""

    def __init__(self, model: Any):
        from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

        if not supports(model.config):
            raise ValueError("this DeBERTa configuration needs transformers' own forward")
        self.model = model
        self._build_relative_position = hf.build_relative_position
        config = model.config
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        encoder = model.encoder
        self.span = config.position_buckets  # the attention's att_span (pos_ebd_size)
        self.max_relative_positions = encoder.max_relative_positions

    def encode(self, seqs: list[list[int]]) -> Any:
        import torch

        model = self.model
        device = model.embeddings.word_embeddings.weight.device
        lengths = [len(s) for s in seqs]
        batch, longest = len(seqs), max(lengths)
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
        # Where each packed token sits in the padded [batch * longest] view used by attention.
        slots = torch.cat([torch.arange(n, device=device) + b * longest for b, n in enumerate(lengths)])
        lens = torch.tensor(lengths, device=device)
        key_ok = torch.arange(longest, device=device)[None, :] < lens[:, None]  # [batch, longest]

        emb = model.embeddings
        x = emb.LayerNorm(emb.word_embeddings(ids))

        encoder = model.encoder
        rel_embeddings = encoder.get_rel_embedding()
        rel = self._build_relative_position(
            x.new_empty(longest, 0),
            x.new_empty(longest, 0),
            bucket_size=self.span,
            max_position=self.max_relative_positions,
        )[0]
        c2p_pos = torch.clamp(rel + self.span, 0, self.span * 2 - 1)
        p2c_pos = torch.clamp(-rel + self.span, 0, self.span * 2 - 1)
        lo = int(torch.minimum(c2p_pos.min(), p2c_pos.min()))
        hi = int(torch.maximum(c2p_pos.max(), p2c_pos.max()))
        rel_rows = rel_embeddings[lo : hi + 1]
        c2p_idx = (c2p_pos - lo).expand(batch, self.heads, longest, longest)
        p2c_idx = (p2c_pos - lo).expand(batch, self.heads, longest, longest)
        # Padded keys get the same large negative score as in the reference's masked_fill.
        neg = torch.finfo(x.dtype).min
        key_pad = ~key_ok[:, None, None, :]
        scale = torch.sqrt(torch.tensor(self.head_dim * 3, dtype=torch.float)).to(x.dtype)

        view = _Padded(slots, batch, longest, self.heads, self.head_dim)
        for layer in encoder.layer:
            att = layer.attention.self
            q = view.heads_of(att.query_proj(x))
            k = view.heads_of(att.key_proj(x))
            v = view.heads_of(att.value_proj(x))
            pos_q = self._pos(att.query_proj(rel_rows))  # [heads, head_dim, R]
            pos_k = self._pos(att.key_proj(rel_rows))
            # The reference's order of operations, in place: the results are the same floats.
            c2p = torch.gather(_per_head_matmul(q, pos_k), -1, c2p_idx).div_(scale)
            p2c = torch.gather(_per_head_matmul(k, pos_q), -1, p2c_idx).div_(scale).transpose(-1, -2)
            scores = torch.matmul(q, k.transpose(-1, -2) / scale).add_(c2p.add_(p2c))
            scores.masked_fill_(key_pad, neg)
            ctx = view.pack(torch.matmul(torch.softmax(scores, dim=-1), v))
            out = layer.attention.output
            x = out.LayerNorm(out.dense(ctx) + x)
            ffn = layer.output
            x = ffn.LayerNorm(ffn.dense(layer.intermediate(x)) + x)
        return x

    def _pos(self, projected: Any) -> Any:
        rows = projected.shape[0]
        return projected.view(rows, self.heads, self.head_dim).permute(1, 2, 0)


def _per_head_matmul(x: Any, pos: Any) -> Any:
    """[batch, heads, L, d] @ [heads, d, R] → [batch, heads, L, R], one product per head over all
    sequences (no copy of ``pos`` per sequence)."""
    batch, heads, length, dim = x.shape
    flat = x.transpose(0, 1).reshape(heads, batch * length, dim)
    return (flat @ pos).view(heads, batch, length, -1).transpose(0, 1)


class _Padded:
    """Moves packed [tokens, hidden] rows to a padded [batch, heads, longest, head_dim] view and back."""

    def __init__(self, slots: Any, batch: int, longest: int, heads: int, head_dim: int):
        self.slots = slots
        self.batch, self.longest, self.heads, self.head_dim = batch, longest, heads, head_dim

    def heads_of(self, packed: Any) -> Any:
        hidden = packed.shape[-1]
        padded = packed.new_zeros(self.batch * self.longest, hidden)
        padded.index_copy_(0, self.slots, packed)
        return padded.view(self.batch, self.longest, self.heads, self.head_dim).transpose(1, 2)

    def pack(self, ctx: Any) -> Any:
        flat = ctx.transpose(1, 2).reshape(self.batch * self.longest, self.heads * self.head_dim)
        return flat.index_select(0, self.slots)
