"""A lean beam search for T5 (``T5ForConditionalGeneration``), batch size 1, with transformers'
``generate`` semantics.

``generate`` spends most of a decoder step on a small model in Python: module calls, the cache
objects, the stack's mask building, and beam bookkeeping over many small tensors. ``LeanT5`` runs
the same step with raw torch ops on the model's own weights:

- the encoder runs once, as ``generate`` runs it (batch 1); each decoder layer's cross-attention
  keys and values are projected once, with batch 1, and copied per beam once per call (never
  reordered: every beam's rows are the same);
- a decoder step is T5's: RMS layer norms, self-attention over a preallocated per-beam key/value
  buffer (reordered by beam index), the relative position bias of decoder layer 0, no scaling
  of q.k, cross-attention without a bias, the gated or plain feed-forward, the final norm and
  ``lm_head`` (with ``scale_decoder_outputs`` as the model applies it). Attention uses the
  model's own implementation, ``sdpa`` or ``eager``, with the same arguments as transformers;
- the search is transformers 5's ``_beam_search`` for one prompt (``service.models.fusers.t5search``).
  One beam is ``_sample``'s greedy search;
- several prompts' searches can share a step (``LeanT5.step``, batched fusion): their beams'
  rows go through the norms and products together (``F.linear`` gives every row the same floats
  whatever the rows around it; the tests check the logits bit for bit), while attention and the
  search run per prompt with the shapes they have alone. A model with skinny products steps each
  prompt on its own (see ``_step_many``). A prompt's tokens are the same alone and batched.

It refuses (``prepare`` returns a reason) whatever generation setting it does not implement; the
caller then uses ``generate``. What must match ``Blender.fuse`` is the text; the tests check the
token ids against ``generate``. The logits were also bit-identical to ``generate``'s at every step
on the tiny and the T5-base-shaped fuser (same kernels, same layouts, same row counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from service.models.fusers.products import rows_invariant
from service.models.fusers.t5search import Beams, Buffers, Decode, Greedy, Plan, StepHook, plan_for

__all__ = ["Decode", "LeanT5", "Plan", "StepHook"]


@dataclass
class _Layer:
    ln_self: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    ln_cross: torch.Tensor
    cq: torch.Tensor
    ck: torch.Tensor
    cv: torch.Tensor
    co: torch.Tensor
    ln_ff: torch.Tensor
    wi: tuple[torch.Tensor, ...]  # (wi_0, wi_1) gated, (wi,) plain
    wo: torch.Tensor


class LeanT5:
    """The lean decode path for one loaded T5 model (built once, reused per call).

    ``skinny_min_weights``: on a CPU, products with at most ``skinny_rows`` rows and a weight of at
    least that many elements run as weight @ xᵀ (as ``GenFuser``'s patched decoder does); None:
    always the plain product.
    """

    def __init__(self, model: Any, skinny_min_weights: int | None = None, skinny_rows: int = 16) -> None:
        cfg = model.config
        self.model = model
        self.config = cfg
        self.heads: int = cfg.num_heads
        self.d_kv: int = cfg.d_kv
        self.eps: float = cfg.layer_norm_epsilon
        self.gated: bool = bool(cfg.is_gated_act)
        self.attn: str = str(cfg._attn_implementation)
        self.scale_out: float | None = cfg.d_model**-0.5 if getattr(cfg, "scale_decoder_outputs", False) else None
        self.skinny_min = skinny_min_weights
        self.skinny_rows = skinny_rows
        dec = model.get_decoder()
        self.embed = dec.embed_tokens.weight
        self.final_ln = dec.final_layer_norm.weight
        self.lm_head = model.get_output_embeddings().weight
        self.bias_module = dec.block[0].layer[0].SelfAttention
        from transformers.activations import ACT2FN

        self.act = ACT2FN[cfg.dense_act_fn]
        self.layers: list[_Layer] = []
        for block in dec.block:
            sa, ca, ff = block.layer[0], block.layer[1], block.layer[2]
            dense = ff.DenseReluDense
            wi = (dense.wi_0.weight, dense.wi_1.weight) if self.gated else (dense.wi.weight,)
            self.layers.append(
                _Layer(
                    sa.layer_norm.weight,
                    sa.SelfAttention.q.weight,
                    sa.SelfAttention.k.weight,
                    sa.SelfAttention.v.weight,
                    sa.SelfAttention.o.weight,
                    ca.layer_norm.weight,
                    ca.EncDecAttention.q.weight,
                    ca.EncDecAttention.k.weight,
                    ca.EncDecAttention.v.weight,
                    ca.EncDecAttention.o.weight,
                    ff.layer_norm.weight,
                    wi,
                    dense.wo.weight,
                )
            )
        big = [w for layer in self.layers for w in (layer.q, layer.o, layer.cq, layer.co, *layer.wi, layer.wo)]
        self.skinny = skinny_min_weights is not None and any(
            w.numel() >= skinny_min_weights for w in [*big, self.lm_head]
        )
        # Sharing a step's products across prompts is exact only where this CPU's kernels give a
        # row the same floats whatever the rows around it (not so on every CPU: see rows_invariant).
        self.shares_products = not self.skinny and rows_invariant(
            [w for layer in self.layers for w in (layer.q, layer.k, layer.o, layer.cq, *layer.wi, layer.wo)]
            + [self.lm_head]
        )
        self._bias: list[torch.Tensor] = []  # [1, heads, 1, n] for query position n - 1

    # -- what it accepts ---------------------------------------------------------------------

    @staticmethod
    def unsupported_model(model: Any) -> str | None:
        """Why this model cannot take the lean path, or None."""
        from transformers import T5ForConditionalGeneration

        if type(model) is not T5ForConditionalGeneration:
            return f"model class {type(model).__name__}"
        cfg = model.config
        if model.training:
            return "model in training mode"
        if str(cfg._attn_implementation) not in ("sdpa", "eager"):
            return f"attention implementation {cfg._attn_implementation}"
        dec: Any = model.get_decoder()  # type: ignore[no-untyped-call]
        head: Any = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        for name, p in [*dec.named_parameters(), ("lm_head.weight", head.weight)]:
            if p.dtype != torch.float32:
                return f"{name} is {p.dtype}, the lean path is float32 only"
        for m in [*dec.modules(), head]:
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                return "a decoder linear layer with a bias"
            if m._forward_hooks or m._forward_pre_hooks:
                return "forward hooks on the decoder"
        if len(dec.block) == 0 or any(len(b.layer) != 3 for b in dec.block):
            return "unexpected decoder layout"
        return None

    def prepare(self, num_beams: int, max_new_tokens: int, **gen_kwargs: Any) -> Plan | str:
        """The plan for ``generate(num_beams=..., max_new_tokens=..., **gen_kwargs)`` with the
        model's generation config, or why it is not supported."""
        return plan_for(self.model, num_beams, max_new_tokens, **gen_kwargs)

    # -- the model's step ----------------------------------------------------------------------

    def _lin(self, x: torch.Tensor, w: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """x [rows, in] @ wᵀ; ``rows``: the row count transformers' product would have had."""
        n = x.shape[0] if rows is None else rows
        if self.skinny_min is not None and n <= self.skinny_rows and w.numel() >= self.skinny_min:
            return torch.mm(w, x.t()).t()
        return F.linear(x, w)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(variance + self.eps))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.attn == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        scores = torch.matmul(q, k.transpose(2, 3)) + bias
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    def _position_bias(self, n: int) -> torch.Tensor:
        """The self-attention bias of query position n - 1 over keys 0..n-1: [1, heads, 1, n]."""
        if n > len(self._bias):
            size = max(n, 2 * len(self._bias), 128)
            with torch.inference_mode():
                table = self.bias_module.compute_bias(size, size, device=self.embed.device)[0]
            self._bias = [table[:, i : i + 1, : i + 1].unsqueeze(0).contiguous() for i in range(size)]
        return self._bias[n - 1]

    def _step(
        self,
        tokens: torch.Tensor,
        pos: int,
        buf: Buffers,
        hf_rows: int,
    ) -> torch.Tensor:
        """Logits [beams, vocab] for the next token of each beam; writes position ``pos`` of the
        key/value buffers [beams, heads, max_len, d_kv]."""
        beams, h, dk = tokens.shape[0], self.heads, self.d_kv
        x = F.embedding(tokens, self.embed)
        bias = self._position_bias(pos + 1)
        for layer, kbuf, vbuf, (ck, cv) in zip(self.layers, buf.keys, buf.values, buf.cross, strict=True):
            y = self._norm(x, layer.ln_self)
            q = self._lin(y, layer.q, hf_rows).reshape(beams, h, 1, dk)
            kbuf[:, :, pos] = self._lin(y, layer.k, hf_rows).reshape(beams, h, dk)
            vbuf[:, :, pos] = self._lin(y, layer.v, hf_rows).reshape(beams, h, dk)
            a = self._attend(q, kbuf[:, :, : pos + 1], vbuf[:, :, : pos + 1], bias)
            x = x + self._lin(a.reshape(beams, h * dk), layer.o, hf_rows)
            # Cross-attention over the keys and values projected once ([beams, heads, src_len, d_kv]).
            y = self._norm(x, layer.ln_cross)
            q = self._lin(y, layer.cq, hf_rows).reshape(beams, h, 1, dk)
            a = self._attend(q, ck, cv, buf.cross_bias)
            x = x + self._lin(a.reshape(beams, h * dk), layer.co, hf_rows)
            y = self._norm(x, layer.ln_ff)
            if self.gated:
                f = self.act(self._lin(y, layer.wi[0], hf_rows)) * self._lin(y, layer.wi[1], hf_rows)
            else:
                f = self.act(self._lin(y, layer.wi[0], hf_rows))
            x = x + self._lin(f, layer.wo, hf_rows)
        x = self._norm(x, self.final_ln)
        if self.scale_out is not None:
            x = x * self.scale_out
        return self._lin(x, self.lm_head, hf_rows)

    def _attend_each(self, q: torch.Tensor, parts: list[Decode], layer: int, cross: bool) -> torch.Tensor:
        """Each prompt's attention over its own keys and values, with the shapes it has alone;
        q [rows, heads * d_kv] -> [rows, heads * d_kv]."""
        h, dk = self.heads, self.d_kv
        out = []
        for qd, d in zip(torch.split(q, [d.rows for d in parts]), parts, strict=True):
            qd = qd.reshape(d.rows, h, 1, dk)
            if cross:
                k, v = d.buf.cross[layer]
                a = self._attend(qd, k, v, d.buf.cross_bias)
            else:
                n = d.pos + 1
                a = self._attend(qd, d.buf.keys[layer][:, :, :n], d.buf.values[layer][:, :, :n], self._position_bias(n))
            out.append(a.reshape(d.rows, h * dk))
        return torch.cat(out)

    def _write_kv(self, parts: list[Decode], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        h, dk, at = self.heads, self.d_kv, 0
        for d in parts:
            d.buf.keys[layer][:, :, d.pos] = k[at : at + d.rows].reshape(d.rows, h, dk)
            d.buf.values[layer][:, :, d.pos] = v[at : at + d.rows].reshape(d.rows, h, dk)
            at += d.rows

    def _step_one(self, d: Decode) -> torch.Tensor:
        return self._step(torch.tensor(d.search.tokens(), device=self.embed.device), d.pos, d.buf, d.rows)

    def _step_many(self, parts: list[Decode]) -> torch.Tensor:
        """Logits [rows, vocab] of every prompt's beams (in ``parts``' order) for their next token.

        Products run over all rows (``F.linear``: each row's floats do not depend on the rows around
        it). With skinny products each prompt runs its own step instead: their floats depend on the
        row count and on the layout of the rows (so do the attention kernels' on the layout of q),
        and on a CPU they are compute-bound from 4 rows, so sharing them would save little."""
        if not self.shares_products:
            return torch.cat([self._step_one(d) for d in parts])
        lin = F.linear
        tokens = torch.tensor([t for d in parts for t in d.search.tokens()], device=self.embed.device)
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            y = self._norm(x, layer.ln_self)
            q = lin(y, layer.q)
            self._write_kv(parts, i, lin(y, layer.k), lin(y, layer.v))
            x = x + lin(self._attend_each(q, parts, i, cross=False), layer.o)
            y = self._norm(x, layer.ln_cross)
            q = lin(y, layer.cq)
            x = x + lin(self._attend_each(q, parts, i, cross=True), layer.co)
            y = self._norm(x, layer.ln_ff)
            f = self.act(lin(y, layer.wi[0]))
            x = x + lin(f * lin(y, layer.wi[1]) if self.gated else f, layer.wo)
        x = self._norm(x, self.final_ln)
        if self.scale_out is not None:
            x = x * self.scale_out
        return lin(x, self.lm_head)

    # -- decoding ------------------------------------------------------------------------------

    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        plan: Plan,
        on_step: StepHook | None = None,
    ) -> Decode | None:
        """Runs the encoder for one prompt and sets up its decode, or None for an input it does
        not take (several rows, padding)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            return None
        if attention_mask is not None and not bool(attention_mask.all()):
            return None
        with torch.inference_mode():
            enc = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            hidden = enc.last_hidden_state[0]  # [src_len, d_model]
            src_len, h, dk, nb = hidden.shape[0], self.heads, self.d_kv, plan.num_beams

            # Projected once (transformers projects nb x src_len rows, which decides the skinny
            # product), then one contiguous copy per beam as transformers' cache holds them: the
            # attention kernel's floats depend on the layout (views of one copy differ in the
            # last bits on a T5-base shape, and run slower there).
            def shared(w: torch.Tensor) -> torch.Tensor:
                kv = self._lin(hidden, w, nb * src_len).reshape(src_len, h, dk).transpose(0, 1)
                return kv.unsqueeze(0).expand(nb, -1, -1, -1).contiguous()

            cross = [(shared(layer.ck), shared(layer.cv)) for layer in self.layers]
            cross_bias = torch.zeros((1, h, 1, src_len), dtype=hidden.dtype, device=hidden.device)
            size = (nb, h, plan.max_new_tokens, dk)
            keys = [torch.empty(size, dtype=hidden.dtype, device=hidden.device) for _ in self.layers]
            values = [torch.empty(size, dtype=hidden.dtype, device=hidden.device) for _ in self.layers]
        buf = Buffers(keys, values, cross, cross_bias)
        search = Greedy(plan, on_step) if nb == 1 else Beams(plan, on_step, hidden.device)
        return Decode(buf, search, nb)

    def logits(self, parts: list[Decode]) -> torch.Tensor:
        """Logits [rows, vocab] of every prompt's beams (in ``parts``' order) for their next token:
        one prompt alone, several in a shared step."""
        return self._step_one(parts[0]) if len(parts) == 1 else self._step_many(parts)

    def step(self, parts: list[Decode]) -> None:
        """One decoder step for every unfinished decode in ``parts``, batched."""
        live = [d for d in parts if not d.done]
        if not live:
            return
        with torch.inference_mode():
            logits = self.logits(live)
            at = 0
            for d in live:
                d.search.advance(logits[at : at + d.rows], d.pos, [*d.buf.keys, *d.buf.values])
                at += d.rows
                d.pos += 1

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        plan: Plan,
        on_step: StepHook | None = None,
    ) -> list[int] | None:
        """The token ids ``generate`` returns for this one prompt (decoder start token first),
        or None for an input it does not take (several rows, padding)."""
        decode = self.start(input_ids, attention_mask, plan, on_step)
        return None if decode is None else self.run(decode)

    def run(self, decode: Decode) -> list[int]:
        """Steps one decode alone to its end; its token ids (decoder start token first)."""
        while not decode.done:
            self.step([decode])
        return decode.result()
