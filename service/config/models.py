"""Rankers and fusers: the gateway's own model work (PairRM, GenFuser) and the LLM fuser."""

from __future__ import annotations

import string
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from service.config.base import Device, DType, Name, Strict
from service.config.members import Sampling

ThreadBudget = Annotated[
    int | None,
    Field(
        ge=1,
        le=512,
        description="Intra-op CPU threads of this model's own worker thread, set there when it starts (each "
        "model's budget explicit: a worker otherwise inherits whatever another set last). Default: the gateway's "
        "torch_threads, else torch's default (one per core). With members on the same CPU, budgets that add up "
        "to the cores the members leave free avoid the models' thread teams waiting on each other.",
    ),
]


class RankerConfig(Strict):
    """A PairRM ranker (PairRM-hf format: a directory or hub id)."""

    kind: Literal["pairrm"] = Field("pairrm", description="The ranker's kind (only PairRM).")
    checkpoint: str = Field(description="A PairRM-hf directory or hub id (llm-blender's DebertaV2PairRM).")
    device: Device = "cpu"
    dtype: DType = Field("float32", description="Weights and activations: float32, float16 or bfloat16.")
    source_max_length: int = Field(
        1224, ge=8, description="Tokens of the source (instruction + input) at most, as llm-blender cuts it."
    )
    candidate_max_length: int = Field(
        412, ge=8, description="Tokens per candidate at most (with the source's unused room shared out)."
    )
    aggregation: Literal["max_logits", "max_wins"] = Field(
        "max_logits", description="How the comparison matrix becomes scores (llm-blender's two rules)."
    )
    max_batch_pairs: int = Field(32, ge=1, description="Pairs per forward pass at most.")
    scheme: Literal["full", "tournament", "bubble", "topk"] = Field(
        "full",
        description="Which pairs are compared. full: every ordered pair, llm-blender's scores (exact). "
        "Opt-in and cheaper, the scores then only order the candidates: tournament (a knockout, the best in "
        "2(n-1) comparisons, in about log2(n) rounds), bubble (one bubble pass, 2(n-1) comparisons in n-1 "
        "rounds), topk (the knockout, then replays among those beaten only by the selected, to select "
        "`select_k` in order).",
    )
    select_k: int = Field(
        3, ge=1, description="topk scheme: candidates found in order; give it the ensembles' `fuse_top_k`."
    )
    max_batch_tokens: int = Field(
        16384, ge=64, description="Padded tokens (pairs x longest pair) per forward pass at most."
    )
    packed: bool = Field(
        True,
        description="Run pairs through the gateway's packed DeBERTa forward (same weights and arithmetic, no "
        "padding computed, only the relative positions that occur); false, or a checkpoint it does not "
        "support: transformers' forward on padded batches.",
    )
    threads: ThreadBudget = None
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long the batching worker, woken by a request, waits for others to share its forwards.",
    )


class FuserConfig(Strict):
    """A GenFuser: a seq2seq checkpoint fed the top-k candidates in llm-blender's format."""

    kind: Literal["genfuser"] = Field("genfuser", description="A seq2seq fuser (llm-blender's GenFuser).")
    checkpoint: str = Field(description="A seq2seq (T5) directory or hub id.")
    device: Device = "cpu"
    dtype: DType = Field("float32", description="Weights and activations: float32, float16 or bfloat16.")
    max_length: int = Field(1024, ge=16, description="Tokens of the fuser's input at most (it is cut beyond).")
    candidate_max_length: int = Field(
        128, ge=1, description="Tokens per candidate at most, as llm-blender cuts them (then `...`)."
    )
    num_beams: int = Field(4, ge=1, le=16, description="Beam search width (Blender.fuse: 4).")
    max_new_tokens: int | None = Field(None, ge=1, description="Default: candidate_max_length.")
    shared_cross_cache: bool = Field(
        True,
        description="Beam search leaves the cross-attention cache in place between steps: its rows are the "
        "encoder's, the same for every beam, so transformers' reordering of them each step only copies "
        "(same output, checked against Blender.fuse); false: transformers' plain generate.",
    )
    skinny_products: bool = Field(
        True,
        description="On a CPU, the decoder's matrix products with a few rows (one per beam) run as "
        "weight x input^T, which streams each weight from memory once: about 3x the bandwidth of the "
        "plain product. Their results differ from it in the last bits; the text was identical to "
        "Blender.fuse's on the parity prompts. False: the plain products.",
    )
    threads: ThreadBudget = None
    engine: Literal["torch", "ctranslate2"] = Field(
        "torch",
        description="torch: transformers' model (with lean_decode, skinny_products), fused texts identical to "
        "Blender.fuse's. ctranslate2: the checkpoint converted once into the gateway's cache and run by "
        "CTranslate2 (pip install 'ensemble-gateway[ct2]'); on a CPU it was not faster than the lean decoder, "
        "and its beam search stops as transformers' early_stopping=True does, so some fused texts differ from "
        "Blender.fuse's (docs/PERFORMANCE.md); a stream then arrives in one piece.",
    )
    compute_type: Literal[
        "default", "auto", "float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16"
    ] = Field(
        "default",
        description="engine ctranslate2: the precision it computes in (default: the converted weights' float32 "
        "on a CPU; int8 changes more texts).",
    )
    lean_decode: bool = Field(
        True,
        description="For a T5 fuser, beam search runs in service/models/fusers/t5decode.py: transformers' beam search "
        "(same steps, same output tokens) on the model's weights with plain torch operations, the "
        "cross-attention keys and values computed once for all beams, without transformers' per-step "
        "module, cache and bookkeeping overhead. Settings it does not implement fall back to "
        "transformers' generate. False: transformers' generate always.",
    )
    max_batch_requests: int = Field(
        8,
        ge=1,
        description="Lean decode: fusions that share the decoder's steps at most (continuous batching: one that "
        "arrives joins at the next step, one that ends leaves). Each keeps the tokens it gets alone. 1: one "
        "fusion at a time.",
    )
    max_batch_tokens: int = Field(
        16384,
        ge=16,
        description="Lean decode: no fusion joins while the input tokens of those decoding reach this many "
        "(their cross-attention keys and values are held per beam).",
    )


DEFAULT_AGGREGATION_TEMPLATE = """\
You have been given responses from several models to the user's request below, ranked best \
first. Synthesize them into one better response: weigh what they say critically, since some of \
it may be biased or wrong; keep what is correct and useful; do not simply copy one of them or \
mention that there were several. Reply with the response only.

{instruction_block}Responses, best first:
{candidates}"""

_TEMPLATE_FIELDS = {"instruction", "instruction_block", "input", "candidates"}


class LLMFuserConfig(Strict):
    """A fuser that asks an OpenAI-compatible model to synthesize the ranked candidates
    (Mixture-of-Agents style). The template becomes the system message; the user's input is the
    user message. Template fields: {instruction}, {instruction_block}, {input}, {candidates}."""

    kind: Literal["llm"] = Field(description="An OpenAI-compatible model as the fuser.")
    endpoint: str | None = Field(None, description="Base URL of an OpenAI-compatible server.")
    server: Name | None = Field(None, description="Name of a server under `servers` instead.")
    model: str = Field(description="The model name on that server.")
    template: str = Field(DEFAULT_AGGREGATION_TEMPLATE, description="The aggregation prompt.")
    sampling: Sampling = Field(default_factory=Sampling, description="How the fusing model samples.")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Per-call timeout of the fusing model.")
    api_key_env: str | None = Field(None, description="Env var holding that server's API key.")

    @model_validator(mode="after")
    def _check(self) -> LLMFuserConfig:
        if (self.endpoint is None) == (self.server is None):
            raise ValueError("set exactly one of `endpoint` or `server`")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as e:
            raise ValueError(f"template: {e}") from e
        unknown = fields - _TEMPLATE_FIELDS
        if unknown:
            raise ValueError(f"template: unknown fields {sorted(unknown)}; known: {sorted(_TEMPLATE_FIELDS)}")
        if "candidates" not in fields:
            raise ValueError("template: must contain {candidates}")
        return self


class RemoteModelConfig(Strict):
    """A ranker or fuser served by the model tier: an ``endpoint`` instead of a ``checkpoint``.
    Calls are retried after connection errors and 5xx (``resilience.retries``) and a breaker
    skips the tier after consecutive failures (``resilience.breaker``); when it fails the
    pipeline degrades as for a local model (member order for a ranker, the top candidate for a
    fuser) and the answer says so."""

    kind: Literal["remote"] = Field("remote", description="Served by `ensemble-gateway serve-models`.")
    endpoint: str = Field(description="The tier's base URL, e.g. http://model-tier:8001.")
    model: Name | None = Field(None, description="Its name on the tier (default: this ranker's or fuser's name).")
    api_key_env: str | None = Field(None, description="Env var with a key the tier accepts.")
    timeout_s: float = Field(30.0, gt=0, le=600, description="Longest a call may take, retries included.")

    @model_validator(mode="after")
    def _url(self) -> RemoteModelConfig:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint: an http:// or https:// URL")
        return self


def _kind(value: object, local: str) -> str:
    """A ranker's or fuser's kind: as written; else ``remote`` for an ``endpoint`` without a
    ``checkpoint``; else the local model's."""
    if isinstance(value, dict):
        if "kind" in value:
            return str(value["kind"])
        return "remote" if "endpoint" in value and "checkpoint" not in value else local
    return str(getattr(value, "kind", local))


def ranker_kind(value: object) -> str:
    return _kind(value, "pairrm")


def fuser_kind(value: object) -> str:
    return _kind(value, "genfuser")


AnyRankerConfig = Annotated[
    Annotated[RankerConfig, Tag("pairrm")] | Annotated[RemoteModelConfig, Tag("remote")],
    Discriminator(ranker_kind),
]
AnyFuserConfig = Annotated[
    Annotated[FuserConfig, Tag("genfuser")]
    | Annotated[LLMFuserConfig, Tag("llm")]
    | Annotated[RemoteModelConfig, Tag("remote")],
    Discriminator(fuser_kind),
]
