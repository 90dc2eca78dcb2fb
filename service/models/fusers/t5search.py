"""The lean T5 decoder's plan and bookkeeping (``service.models.fusers.t5decode``): which ``generate``
settings it implements (``plan_for``), one prompt's search (transformers 5's ``_beam_search`` for
one prompt, or ``_sample``'s greedy search for one beam), and one prompt's decode in progress
(``Decode``: its buffers, its search, its position).

A search hands out the tokens its beams feed the next decoder step and takes that step's logits
for its own rows; it knows nothing of the other prompts in a batched step, so a prompt's tokens do
not depend on what it was batched with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

StepHook = Callable[[list[list[int]]], bool]
"""Called each step with the sequences transformers hands its stopping criteria (decoder start
token first); True stops the search as a stopping criterion would."""


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


@dataclass(frozen=True)
class Plan:
    """What one ``generate`` call would do, once ``LeanT5.prepare`` accepted it."""

    num_beams: int
    max_new_tokens: int
    start: int
    eos: int
    length_penalty: float
    early_stopping: bool | str


def plan_for(model: Any, num_beams: int, max_new_tokens: int, **gen_kwargs: Any) -> Plan | str:
    """The plan for ``generate(num_beams=..., max_new_tokens=..., **gen_kwargs)`` with the
    model's generation config, or why it is not supported."""
    if model.config._get_generation_parameters():
        return "generation parameters in the model config (generate refuses them)"
    # generate's own order: its kwargs over the model's generation config over global
    # defaults; settings left unset (None) take the defaults, which are the neutral values.
    gc = copy.deepcopy(model.generation_config)
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
        start = model.config.decoder_start_token_id
    if not isinstance(eos, int) or not isinstance(start, int):
        return "no end-of-sequence or decoder start token"
    if not isinstance(num_beams, int) or num_beams < 1 or max_new_tokens < 1:
        return "num_beams and max_new_tokens must be positive"
    early = False if gc.early_stopping is None else gc.early_stopping
    if early not in (True, False, "never"):
        return f"early_stopping={early!r}"
    penalty = 1.0 if gc.length_penalty is None else float(gc.length_penalty)
    return Plan(num_beams, max_new_tokens, start, eos, penalty, early)


class Greedy:
    """One beam: the most likely token each step, until end-of-sequence or the limit."""

    def __init__(self, plan: Plan, on_step: StepHook | None) -> None:
        self.plan = plan
        self.on_step = on_step
        self.seq = [plan.start]
        self.done = False

    def tokens(self) -> list[int]:
        return [self.seq[-1]]

    def advance(self, logits: torch.Tensor, pos: int, caches: list[torch.Tensor]) -> None:
        """Takes step ``pos``'s logits [1, vocab]."""
        self.seq.append(int(torch.argmax(logits.float(), dim=-1)[0]))
        stop = self.on_step([list(self.seq)]) if self.on_step is not None else False
        self.done = self.seq[-1] == self.plan.eos or stop or pos + 1 >= self.plan.max_new_tokens

    def result(self) -> list[int]:
        return self.seq


class Beams:
    """transformers' beam search for one prompt: log-softmax, the top 2 x num_beams continuations,
    end-of-sequence and max-length stops, the running beams, the finished beams with the length
    penalty, the early-stop heuristic, the best finished sequence."""

    def __init__(self, plan: Plan, on_step: StepHook | None, device: torch.device) -> None:
        nb = plan.num_beams
        self.plan = plan
        self.on_step = on_step
        self.device = device
        self.max_length = 1 + plan.max_new_tokens  # the decoder prompt is the start token
        # Running beams: only the first counts at the start (the others score -1e9).
        self.run_scores = torch.zeros(nb, dtype=torch.float32, device=device)
        self.run_scores[1:] = -1e9
        self.run_seqs = [[plan.start] for _ in range(nb)]
        # Finished beams: scores with the length penalty; placeholders score -1e9.
        self.fin_scores = torch.full((nb,), -1e9, dtype=torch.float32, device=device)
        self.fin_seqs: list[list[int]] = [list(s) for s in self.run_seqs]
        self.fin_done = [False] * nb
        self.top_mask = torch.arange(2 * nb, device=device) < nb  # only these may finish
        self.identity = list(range(nb))
        self.cur_len = 1
        self.done = False

    def tokens(self) -> list[int]:
        # The first step runs all beams too (they all hold the start token): the attention
        # kernels' floats depend on the batch size.
        return [s[-1] for s in self.run_seqs]

    def advance(self, logits: torch.Tensor, pos: int, caches: list[torch.Tensor]) -> None:
        """Takes step ``pos``'s logits [beams, vocab]; reorders ``caches`` (the self-attention
        key/value buffers [beams, heads, max_len, d_kv]) as the beams move."""
        plan = self.plan
        nb, keep, lp, early = plan.num_beams, 2 * plan.num_beams, plan.length_penalty, plan.early_stopping
        device = self.device
        log_probs = F.log_softmax(logits.float(), dim=-1) + self.run_scores[:, None]
        vocab = log_probs.shape[-1]
        top_scores, top_idx = torch.topk(log_probs.reshape(1, -1), k=keep)  # transformers' shapes
        top_scores = top_scores[0]
        idx = top_idx[0].tolist()
        cand = [self.run_seqs[i // vocab] + [i % vocab] for i in idx]
        stop = self.on_step(cand) if self.on_step is not None else False
        at_end = self.cur_len + 1 >= self.max_length or stop
        hits = [at_end or s[-1] == plan.eos for s in cand]
        hits_t = torch.tensor(hits, device=device)

        # Finished beams: the top num_beams continuations that stop, with the length penalty.
        just = hits_t & self.top_mask
        new = top_scores / ((self.cur_len + 1 - 1) ** lp)
        new = new + (~just) * -1.0e9
        merged = torch.cat((self.fin_scores, new))
        chosen = torch.topk(merged[None], k=nb)[1][0]
        self.fin_scores = merged[chosen]
        picks = chosen.tolist()
        just_list = just.tolist()
        self.fin_seqs = [self.fin_seqs[j] if j < nb else cand[j - nb] for j in picks]
        self.fin_done = [self.fin_done[j] if j < nb else just_list[j - nb] for j in picks]
        if all(hits):
            self.done = True
            return

        # Running beams: the best continuations that do not stop.
        running = top_scores + hits_t.to(torch.float32) * -1.0e9
        nxt = torch.topk(running[None], k=nb)[1][0]
        self.run_scores = running[nxt]
        order = nxt.tolist()
        self.run_seqs = [cand[j] for j in order]
        beam_idx = [idx[j] // vocab for j in order]
        if beam_idx != self.identity:
            sel = torch.tensor(beam_idx, device=device)
            for t in caches:
                t[:, :, : pos + 1] = t[:, :, : pos + 1].index_select(0, sel)
        self.cur_len += 1

        # Can the best running beam still beat a finished one? (Slots not finished count -1e9.)
        best_len = self.max_length - 1 if early == "never" and lp > 0.0 else self.cur_len - 1
        best = float(self.run_scores[:1] / (best_len**lp))
        worst = float(self.fin_scores.min())
        beaten = not any(best > (worst if done else -1.0e9) for done in self.fin_done)
        self.done = beaten or (early is True and all(self.fin_done))

    def result(self) -> list[int]:
        return self.fin_seqs[0]


@dataclass
class Buffers:
    """One call's per-layer tensors: self-attention keys and values [beams, heads, max_len, d_kv]
    (written step by step), cross-attention keys and values (fixed), the zero cross bias."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    cross_bias: torch.Tensor


@dataclass(eq=False)
class Decode:
    """One prompt's decode in progress: its buffers, its search, its rows (one per beam), the next
    position."""

    buf: Buffers
    search: Greedy | Beams
    rows: int
    pos: int = 0

    @property
    def done(self) -> bool:
        return self.search.done

    @property
    def source_tokens(self) -> int:
        return int(self.buf.cross_bias.shape[-1])

    def result(self) -> list[int]:
        return self.search.result()
