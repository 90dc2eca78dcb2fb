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
- the search is transformers 5's ``_beam_search`` for one prompt: log-softmax, the top
  2 x num_beams continuations, end-of-sequence and max-length stops, the running beams, the
  finished beams with the length penalty, the early-stop heuristic, the best finished sequence.
  One beam is ``_sample``'s greedy search.

It refuses (``prepare`` returns a reason) whatever generation setting it does not implement; the
caller then uses ``generate``. What must match ``Blender.fuse`` is the text; the tests check the
token ids against ``generate``. The logits were also bit-identical to ``generate``'s at every step
on the tiny and the T5-base-shaped fuser (same kernels, same layouts, same row counts).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

# Generation settings it implements, by their name in ``GenerationConfig.to_diff_dict()``; any
# other setting that differs from transformers' default makes it refuse.
_ALLOWED = {
    "transformers_version",
    "decoder_start_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_length",
    "max_new_tokens",
    "num_beams",
    "num_return_sequences",
    "length_penalty",
    "early_stopping",
    "use_cache",
    "do_sample",
    "min_length",
    "min_new_tokens",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
    "return_dict_in_generate",
}
# Of those, the ones that must keep a neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_return_sequences": (None, 1),
    "use_cache": (None, True),
    "do_sample": (None, False),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "return_dict_in_generate": (None, False),
}

StepHook = Callable[[list[list[int]]], bool]
"""Called each step with the sequences transformers hands its stopping criteria (decoder start
token first); True stops the search as a stopping criterion would."""


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


@dataclass
class _Buffers:
    """One call's per-layer tensors: self-attention keys and values [beams, heads, max_len, d_kv]
    (written step by step), cross-attention keys and values (fixed), the zero cross bias."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    cross_bias: torch.Tensor


@dataclass(frozen=True)
class Plan:
    """What one ``generate`` call would do, once ``LeanT5.prepare`` accepted it."""

    num_beams: int
    max_new_tokens: int
    start: int
    eos: int
    length_penalty: float
    early_stopping: bool | str


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
        if self.config._get_generation_parameters():
            return "generation parameters in the model config (generate refuses them)"
        # generate's own order: its kwargs over the model's generation config over global
        # defaults; settings left unset (None) take the defaults, which are the neutral values.
        gc = copy.deepcopy(self.model.generation_config)
        gc.update(num_beams=num_beams, max_new_tokens=max_new_tokens, **gen_kwargs)
        diff = gc.to_diff_dict()
        extra = sorted(set(diff) - _ALLOWED)
        if extra:
            return f"generation settings {extra}"
        for key, ok in _NEUTRAL.items():
            if key in diff and diff[key] not in ok:
                return f"generation setting {key}={diff[key]!r}"
        eos = gc.eos_token_id
        if isinstance(eos, list | tuple):
            if len(eos) != 1:
                return "several end-of-sequence tokens"
            eos = eos[0]
        start = gc.decoder_start_token_id
        if start is None:
            start = self.config.decoder_start_token_id
        if not isinstance(eos, int) or not isinstance(start, int):
            return "no end-of-sequence or decoder start token"
        if not isinstance(num_beams, int) or num_beams < 1 or max_new_tokens < 1:
            return "num_beams and max_new_tokens must be positive"
        early = False if gc.early_stopping is None else gc.early_stopping
        if early not in (True, False, "never"):
            return f"early_stopping={early!r}"
        penalty = 1.0 if gc.length_penalty is None else float(gc.length_penalty)
        return Plan(num_beams, max_new_tokens, start, eos, penalty, early)

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
        buf: _Buffers,
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

    # -- the search ----------------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        plan: Plan,
        on_step: StepHook | None = None,
    ) -> list[int] | None:
        """The token ids ``generate`` returns for this one prompt (decoder start token first),
        or None for an input it does not take (several rows, padding)."""
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
            buf = _Buffers(keys, values, cross, cross_bias)
            if nb == 1:
                return self._greedy(plan, on_step, buf)
            return self._beams(plan, on_step, buf)

    def _greedy(self, plan: Plan, on_step: StepHook | None, buf: _Buffers) -> list[int]:
        seq = [plan.start]
        device = self.embed.device
        for pos in range(plan.max_new_tokens):
            tokens = torch.tensor([seq[-1]], device=device)
            logits = self._step(tokens, pos, buf, 1)
            seq.append(int(torch.argmax(logits.float(), dim=-1)[0]))
            stop = on_step([list(seq)]) if on_step is not None else False
            if seq[-1] == plan.eos or stop:
                break
        return seq

    def _beams(self, plan: Plan, on_step: StepHook | None, buf: _Buffers) -> list[int]:
        nb, keep, lp, early = plan.num_beams, 2 * plan.num_beams, plan.length_penalty, plan.early_stopping
        device = self.embed.device
        max_length = 1 + plan.max_new_tokens  # the decoder prompt is the start token
        # Running beams: only the first counts at the start (the others score -1e9).
        run_scores = torch.zeros(nb, dtype=torch.float32, device=device)
        run_scores[1:] = -1e9
        run_seqs = [[plan.start] for _ in range(nb)]
        # Finished beams: scores with the length penalty; placeholders score -1e9.
        fin_scores = torch.full((nb,), -1e9, dtype=torch.float32, device=device)
        fin_seqs: list[list[int]] = [list(s) for s in run_seqs]
        fin_done = [False] * nb
        top_mask = torch.arange(keep, device=device) < nb  # only these may finish
        identity = list(range(nb))
        cur_len = 1
        for pos in range(plan.max_new_tokens):
            # The first step runs all beams too (they all hold the start token): the attention
            # kernels' floats depend on the batch size.
            tokens = torch.tensor([s[-1] for s in run_seqs], device=device)
            logits = self._step(tokens, pos, buf, nb)
            log_probs = F.log_softmax(logits.float(), dim=-1) + run_scores[:, None]
            vocab = log_probs.shape[-1]
            top_scores, top_idx = torch.topk(log_probs.reshape(1, -1), k=keep)  # transformers' shapes
            top_scores = top_scores[0]
            idx = top_idx[0].tolist()
            cand = [run_seqs[i // vocab] + [i % vocab] for i in idx]
            stop = on_step(cand) if on_step is not None else False
            at_end = cur_len + 1 >= max_length or stop
            hits = [at_end or s[-1] == plan.eos for s in cand]
            hits_t = torch.tensor(hits, device=device)

            # Finished beams: the top num_beams continuations that stop, with the length penalty.
            just = hits_t & top_mask
            new = top_scores / ((cur_len + 1 - 1) ** lp)
            new = new + (~just) * -1.0e9
            merged = torch.cat((fin_scores, new))
            chosen = torch.topk(merged[None], k=nb)[1][0]
            fin_scores = merged[chosen]
            picks = chosen.tolist()
            just_list = just.tolist()
            fin_seqs = [fin_seqs[j] if j < nb else cand[j - nb] for j in picks]
            fin_done = [fin_done[j] if j < nb else just_list[j - nb] for j in picks]
            if all(hits):
                break

            # Running beams: the best continuations that do not stop.
            running = top_scores + hits_t.to(torch.float32) * -1.0e9
            nxt = torch.topk(running[None], k=nb)[1][0]
            run_scores = running[nxt]
            order = nxt.tolist()
            run_seqs = [cand[j] for j in order]
            beam_idx = [idx[j] // vocab for j in order]
            if beam_idx != identity:
                sel = torch.tensor(beam_idx, device=device)
                for t in (*buf.keys, *buf.values):
                    t[:, :, : pos + 1] = t[:, :, : pos + 1].index_select(0, sel)
            cur_len += 1

            # Can the best running beam still beat a finished one? (Slots not finished count -1e9.)
            best_len = max_length - 1 if early == "never" and lp > 0.0 else cur_len - 1
            best = float(run_scores[:1] / (best_len**lp))
            worst = float(fin_scores.min())
            if not any(best > (worst if done else -1.0e9) for done in fin_done):
                break
            if early is True and all(fin_done):
                break
        return fin_seqs[0]
