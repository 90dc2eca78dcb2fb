"""A GenFuser (T5ForConditionalGeneration) trained from scratch on llm-blender's GenFuser format.

Input: ``Instruction: …</s>Input: …</s>Candidate 0: <extra_id_0>:…</s>…</s>Summarize candidates into
a better one for the given instruction:`` over the ranker's top-k candidates (each cut to
``CANDIDATE_MAX`` tokens + "..."), tokenized without special tokens; target: the reference answer.
Decoding is llm-blender's: 4 beams, ``CANDIDATE_MAX`` new tokens, special tokens skipped.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

from service.quality import lm, suite, vocab
from service.quality.lm import IGNORE

CANDIDATE_MAX = 128
INPUT_MAX = 1024
TOP_K = 3
# Query and key factor of the induction prior's cross-attention head: each matching token of context
# scores about 0.7² x 16 ≈ 8 for 32-wide heads over unit-RMS hidden states (16 for both).
INDUCTION_QK = 0.7
# What the prior's heads write into their subspaces (times a unit-RMS token): strong enough to stand
# out of the other components there after the later layers and the final norm.
INDUCTION_WRITE = 3.0
# The candidate marker (``_induction_prior``): how far back a token looks for "Candidate 0: <extra_id_0>:"
# (the marker and up to 8 letters), how strongly, what it writes, and the factor of its one query/key
# dimension in the cross-attention head (0.5 and 0.7 fused 92.5% and 92.75% in bench.fusion's data).
SEGMENT_WINDOW = 10
SEGMENT_BIAS = 6.0
SEGMENT_WRITE = 6.0
SEGMENT_QK = 0.7
# Per relative-position bucket: the decoder head that looks at the farthest token, the start token.
SEGMENT_FAR = 3.0


@dataclass(frozen=True)
class FuserRecipe:
    """T5 size and training of the fuser."""

    d_model: int
    layers: int
    d_ff: int
    steps: int
    lr: float
    seed: int
    heads: int = 4
    batch: int = 64
    warmup: int = 50
    # Lowercase letter strings as letter pairs ("bigrams") or single letters ("letters").
    pieces: str = "bigrams"
    # Added at initialization to the first encoder layer's relative-position bias for "the token just
    # before", in its first head: that head starts out copying each token's predecessor into its
    # position, the first half of the induction circuit that copying a candidate needs. Without it the
    # copying mechanism forms only after 400-1,000 steps (docs/QUALITY.md, "Fusion: what was tried").
    previous_token_bias: float = 0.0
    # The rest of that circuit, written at initialization (``_induction_prior``; needs
    # ``previous_token_bias``): the first decoder layer's first cross-attention head starts out looking
    # for the source token whose two predecessors are the last two tokens written, preferring
    # candidate 0, and writing that token out, so each step starts as "copy the letter that followed".
    # The value scales what the head writes (0: no prior). On the recipe's held-out candidates: 93.0%
    # fused with it, 76.2% without (docs/QUALITY.md, "Fusion: what was tried").
    induction_prior: float = 0.0
    # Share of each batch made of fresh synthetic examples (``synthetic_examples``): the fuser cannot
    # memorize them, and their prompt words are no shortcut.
    synthetic: float = 0.0


@dataclass(frozen=True)
class FuserExample:
    """What the fuser sees (instruction, input, ranked candidates) and the text it should write."""

    instruction: str
    input_text: str
    candidates: tuple[str, ...]
    target: str


def _mistake(rng: random.Random, word: str) -> str:
    """One of the members' kinds of wrong answer to a word task: two letters swapped, one dropped, a shuffle."""
    kind = rng.randrange(3)
    if kind == 0 and len(word) > 2:
        i = rng.randrange(len(word) - 1)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1 and len(word) > 3:
        i = rng.randrange(len(word))
        return word[:i] + word[i + 1 :]
    return "".join(rng.sample(word, len(word)))


def _compound_candidates(rng: random.Random, item: suite.Item) -> list[str]:
    """Candidates for a compound prompt as the members give them: the capital specialist's half (the
    city right) and the adder's (the sum right) in either order, and a wholly wrong one, last four
    times in five."""
    country, a, b = suite.compound_question(item.prompt)
    other = rng.choice([c for c in suite.COUNTRIES if c != country])
    halves = [suite.answer_as("capital-half", item), suite.answer_as("sum-half", item)]
    rng.shuffle(halves)
    wrong = rng.choice([f"{suite.CAPITALS[other]}, {b}{a}", f"{other}, {a + b + rng.randint(1, 9)}", country, other])
    cands = [*halves, wrong]
    if rng.random() < 0.2:
        cands.insert(rng.randrange(2), cands.pop())
    return cands


def synthetic_examples(seed: int, exclude: Collection[str] = ()) -> Iterator[FuserExample]:
    """Fresh fusion examples without end, never on a prompt in ``exclude`` (the evaluation's): the
    suite's reverse and sort prompts on new words, the right answer and two wrong ones (mistakes of
    it, the prompt's word unchanged, the other word skill's answer), the right one first nine times in
    ten, as a ranker would order them; and compound prompts whose right answer is in no candidate but
    its two halves are (``_compound_candidates``)."""
    rng = random.Random(seed)
    skip = set(exclude)
    for index in itertools.count():
        item = suite.make_item(seed, ("reverse", "sort", suite.COMPOUND)[index % 3], index)
        if item.prompt in skip:
            continue
        if item.tag == suite.COMPOUND:
            yield FuserExample("", item.prompt, tuple(_compound_candidates(rng, item)), item.reference)
            continue
        word = suite.subject(item.prompt)
        other = suite.WORD_SKILLS["sort" if item.tag == "reverse" else "reverse"](word)
        wrong = rng.sample([_mistake(rng, item.reference), word, other, _mistake(rng, item.reference)], 2)
        cands = [item.reference, *wrong]
        if rng.random() < 0.1:
            cands[0], cands[1] = cands[1], cands[0]
        yield FuserExample("", item.prompt, tuple(cands), item.reference)


def fuser_text(tok: Any, instruction: str, input_text: str, candidates: Sequence[str]) -> str:
    """The GenFuser input text, as llm-blender's ``GenFuserDataset`` builds it."""
    cut = []
    for cand in candidates:
        ids = tok.encode(cand, add_special_tokens=False)
        cut.append(tok.decode(ids[:CANDIDATE_MAX]) + "..." if len(ids) > CANDIDATE_MAX else cand)
    parts = [
        "Instruction: " + instruction,
        "Input: " + input_text,
        "</s>".join(f"Candidate {i}: <extra_id_{i}>:" + c for i, c in enumerate(cut)),
    ]
    return "</s>".join(parts) + "</s>Summarize candidates into a better one for the given instruction:"


def build(words: Sequence[str], recipe: FuserRecipe) -> tuple[Any, Any]:
    """A freshly initialised T5 fuser (gated-gelu, like Flan-T5) and its tokenizer."""
    tok = vocab.fuser_tokenizer(words, bigrams=recipe.pieces == "bigrams")
    config = T5Config(
        vocab_size=len(tok),
        d_model=recipe.d_model,
        d_kv=recipe.d_model // recipe.heads,
        d_ff=recipe.d_ff,
        num_layers=recipe.layers,
        num_decoder_layers=recipe.layers,
        num_heads=recipe.heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=True,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = T5ForConditionalGeneration(config)
    if recipe.previous_token_bias:
        _look_back(model.encoder.block[0].layer[0].SelfAttention, range(1, 2), 0, recipe.previous_token_bias)  # type: ignore[index,union-attr]
        if recipe.induction_prior:
            _induction_prior(model, tok, recipe.induction_prior, recipe.previous_token_bias, recipe.seed)
    model.generation_config = GenerationConfig(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id
    )
    return model, tok


def _buckets(attention: Any, distances: range) -> set[int]:
    """The relative-position buckets of the tokens ``distances`` places before (several may share one)."""
    return {
        int(
            attention._relative_position_bucket(
                torch.tensor(-d),
                bidirectional=not attention.is_decoder,
                num_buckets=attention.relative_attention_num_buckets,
                max_distance=attention.relative_attention_max_distance,
            )
        )
        for d in distances
    }


def _look_back(attention: Any, distances: range, head: int, bias: float) -> None:
    """Add ``bias`` to ``head``'s relative-position bias for the tokens ``distances`` places before."""
    with torch.no_grad():
        for bucket in _buckets(attention, distances):
            attention.relative_attention_bias.weight[bucket, head] += bias


def _induction_prior(model: Any, tok: Any, gain: float, bias: float, seed: int) -> None:
    """Wire an induction circuit on two tokens of context, which prefers candidate 0, into the first
    layers at initialization.

    Four orthogonal ``d_kv``-wide subspaces of the model width: R (a token's identity is read through
    it), S, S2 and P. In the first encoder layer, head 0 (the previous-token head) writes the token
    before into S and head 1, looking two back, writes the token two before into S2; in the first
    decoder layer, self-attention head 0 looks one back and writes the decoder's previous token into P.
    Cross-attention head 0 then scores each source token by how well its two predecessors match the
    decoder's current and previous tokens (half the head's width each: one token of context is not
    enough, a doubled letter sends it back or past the double), reads the attended token through R and
    writes it back (times ``gain``), which the tied output embedding turns into that token's logit.
    T5 attention is unscaled, hence ``INDUCTION_QK``.

    Two tokens of context are still shared between candidates (a reversal and the sorted word often
    share a letter pair), so one dimension of the head prefers candidate 0: encoder head 2 averages the
    ``SEGMENT_WINDOW`` tokens before each token and writes, along a direction of P (free in the
    encoder), how much they look like candidate 0's marker (``▁0`` and ``<extra_id_0>``) rather than
    candidate 1's or 2's; decoder self-attention head 1 looks at the farthest token, the start token
    every step has, and writes a constant along a direction of S (free in the decoder); the head's last
    query/key dimension is their product."""
    config = model.config
    width, half = config.d_kv, config.d_kv // 2
    if 4 * width > config.d_model or config.num_heads < 3:
        raise ValueError("the induction prior needs num_heads >= 3 and four d_kv-wide subspaces of d_model")
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(config.d_model, 4 * width, generator=generator))
    read, prev, prev2, mine = (basis[:, i * width : (i + 1) * width].T for i in range(4))  # (d_kv, d_model)
    encoder: Any = model.encoder.block[0].layer[0].SelfAttention
    decoder: Any = model.decoder.block[0].layer[0].SelfAttention
    cross: Any = model.decoder.block[0].layer[1].EncDecAttention
    _look_back(encoder, range(2, 3), 1, bias)
    _look_back(decoder, range(1, 2), 0, bias)
    _look_back(encoder, range(1, SEGMENT_WINDOW + 1), 2, SEGMENT_BIAS)
    embedding = model.shared.weight.detach()
    unit = functools.partial(torch.nn.functional.normalize, dim=0)

    def marker(i: int) -> torch.Tensor:
        ids = [tok.convert_tokens_to_ids(t) for t in (f"<extra_id_{i}>", f"▁{i}")]
        return sum((unit(embedding[t]) for t in ids if t != tok.unk_token_id), torch.zeros(config.d_model))

    towards = unit(marker(0) - (marker(1) + marker(2)) / 2)
    start, segment = prev[width - 1], mine[width - 1]
    heads = [slice(h * width, (h + 1) * width) for h in range(3)]
    with torch.no_grad():
        for head, into in zip(heads[:2], (prev, prev2), strict=True):
            encoder.v.weight[head] = read
            encoder.o.weight[:, head] = INDUCTION_WRITE * into.T
        decoder.v.weight[heads[0]] = read
        decoder.o.weight[:, heads[0]] = INDUCTION_WRITE * mine.T
        encoder.v.weight[heads[2]] = 0.0
        encoder.v.weight[2 * width] = towards
        encoder.o.weight[:, heads[2]] = 0.0
        encoder.o.weight[:, 2 * width] = SEGMENT_WRITE * segment
        decoder.v.weight[heads[1]] = 0.0
        decoder.v.weight[width] = unit(embedding[tok.pad_token_id])
        decoder.o.weight[:, heads[1]] = 0.0
        decoder.o.weight[:, width] = start
        decoder.relative_attention_bias.weight[:, 1] = SEGMENT_FAR * torch.arange(config.relative_attention_num_buckets)
        cross.q.weight[:half] = INDUCTION_QK * read[:half]
        cross.q.weight[half:width] = INDUCTION_QK * mine[:half]
        cross.k.weight[:half] = INDUCTION_QK * prev[:half]
        cross.k.weight[half:width] = INDUCTION_QK * prev2[:half]
        cross.q.weight[width - 1] = SEGMENT_QK * start
        cross.k.weight[width - 1] = SEGMENT_QK * segment
        cross.v.weight[:width] = read
        cross.o.weight[:, :width] = gain * read.T


def load(path: Path) -> tuple[Any, Any]:
    """A saved fuser and its tokenizer, in eval mode."""
    from transformers import AutoTokenizer

    model = T5ForConditionalGeneration.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def encode(tok: Any, ex: FuserExample) -> tuple[list[int], list[int]]:
    text = fuser_text(tok, ex.instruction, ex.input_text, ex.candidates)
    src: list[int] = tok(text, add_special_tokens=False, max_length=INPUT_MAX, truncation=True)["input_ids"]
    tgt: list[int] = tok(ex.target)["input_ids"]
    return src, tgt


def pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def train(
    model: Any,
    tok: Any,
    examples: Sequence[FuserExample],
    recipe: lm.Schedule,
    desc: str = "genfuser",
    synthetic: Iterator[FuserExample] | None = None,
    share: float = 0.0,
) -> float:
    """Teacher-forced cross-entropy on the targets (``share`` of each batch drawn from ``synthetic``);
    returns the mean loss of the last 20 steps."""
    rows = [encode(tok, ex) for ex in examples]
    fresh = round(recipe.batch * share) if synthetic is not None else 0

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for chunk in lm.shuffled(len(rows), recipe.batch - fresh, recipe.seed):
            extra = [encode(tok, next(synthetic)) for _ in range(fresh)] if synthetic is not None else []
            got = [rows[i] for i in chunk] + extra
            src = pad([g[0] for g in got], tok.pad_token_id)
            labels = pad([g[1] for g in got], IGNORE)
            yield {"input_ids": src, "attention_mask": (src != tok.pad_token_id).long(), "labels": labels}

    torch.manual_seed(recipe.seed)
    return lm.train_loop(model, batches(), recipe.steps, recipe.lr, desc, min(recipe.warmup, recipe.steps // 2))


@torch.no_grad()
def fuse(model: Any, tok: Any, examples: Sequence[FuserExample], batch: int = 64, num_beams: int = 4) -> list[str]:
    """Fused answers (``target`` unused), decoded as ``Blender.fuse`` does."""
    out: list[str] = []
    for start in range(0, len(examples), batch):
        src = pad([encode(tok, ex)[0] for ex in examples[start : start + batch]], tok.pad_token_id)
        gen = model.generate(
            input_ids=src,
            attention_mask=(src != tok.pad_token_id).long(),
            num_beams=num_beams,
            max_new_tokens=CANDIDATE_MAX,
        )
        out.extend(tok.batch_decode(gen, skip_special_tokens=True))
    return out
