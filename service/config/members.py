"""Members and the servers the gateway launches for them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from service.config.base import Device, DType, Name, Strict


class Sampling(Strict):
    """Sampling defaults of a member; a request's own values override them."""

    max_tokens: int = Field(128, ge=1, le=32768, description="Tokens to generate at most.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, description="Sampling seed, if the member should be repeatable.")


SoupMethod = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]
# PEFT's add_weighted_adapter combines A and B matrices one by one for these, so ranks must match.
EQUAL_RANK_METHODS = frozenset({"linear", "ties", "dare_linear", "dare_ties"})


class SoupPart(Strict):
    """One adapter of a soup and its weight."""

    adapter: str | None = Field(None, description="A PEFT LoRA directory.")
    member: Name | None = Field(None, description="Instead of `adapter`: a `lora` member of this file, by name.")
    weight: float = Field(1.0, allow_inf_nan=False, description="Its weight in the soup (finite; may be negative).")

    @model_validator(mode="after")
    def _one_source(self) -> SoupPart:
        if (self.adapter is None) == (self.member is None):
            raise ValueError("set exactly one of `adapter` or `member`")
        return self


class SoupConfig(Strict):
    """A LoRA adapter built as a weighted merge of others (AdapterSoup), with PEFT's
    ``add_weighted_adapter``; the gateway builds it into its cache and serves it like any LoRA."""

    method: SoupMethod = Field(
        "linear",
        description="PEFT's combination_type. linear, ties, dare_linear, dare_ties: the adapters' A and B matrices "
        "are combined one by one (ranks must be equal); cat: the rank is the sum, the product exactly the weighted "
        "sum; svd: the weighted sum of products, cut to `svd_rank` by SVD.",
    )
    adapters: list[SoupPart] = Field(min_length=2, description="The adapters and their weights.")
    density: float | None = Field(
        None, gt=0, le=1, description="ties, dare_linear, dare_ties: the share of each adapter's values kept."
    )
    majority_sign_method: Literal["total", "frequency"] = Field("total", description="ties, dare_ties: sign election.")
    svd_rank: int | None = Field(None, ge=1, description="svd: the result's rank (default: the largest input rank).")
    seed: int = Field(0, description="dare_*: the seed of the random drop mask (the soup is cached per recipe).")

    @model_validator(mode="after")
    def _density(self) -> SoupConfig:
        if self.method in ("ties", "dare_linear", "dare_ties") and self.density is None:
            raise ValueError(f"method {self.method} needs `density`")
        if self.svd_rank is not None and self.method != "svd":
            raise ValueError("`svd_rank` is only for method svd")
        return self


class _Member(Strict):
    """What every member kind has: where it is reached (an OpenAI-compatible API), how it samples,
    how long it may take, and how many candidates it gives."""

    name: Name = Field(description="Unique member name, used in responses and metrics.")
    endpoint: str | None = Field(None, description="Base URL of an OpenAI-compatible server, e.g. http://host:8000/v1.")
    server: Name | None = Field(None, description="Name of a server under `servers` instead.")
    api: Literal["chat", "completions"] = Field(
        "chat", description="chat: /chat/completions with messages; completions: raw prompt."
    )
    system_prompt: str | None = Field(None, description="System message prepended for this member.")
    sampling: Sampling = Field(default_factory=Sampling, description="This member's sampling defaults.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Per-call timeout for this member.")
    samples: int = Field(
        1,
        ge=1,
        le=16,
        description="Candidates this member gives per request, each its own call (`name#1`, `name#2`, ...; "
        "with a seed, sample i uses seed + i - 1), ranked, voted and fused like any candidate. Useful only "
        "above temperature 0 (greedy samples are identical).",
    )
    extensions: Literal["pass", "drop"] = Field(
        "pass",
        description="vLLM's sampling extensions in a client's request (top_k, min_p, ignore_eos, ...): `pass` "
        "sends them on (vLLM takes them); `drop` leaves them out, for a server that refuses unknown fields.",
    )
    api_key_env: str | None = Field(None, description="Env var holding this member's API key.")

    @model_validator(mode="after")
    def _one_target(self) -> Any:
        if (self.endpoint is None) == (self.server is None):
            raise ValueError("set exactly one of `endpoint` or `server`")
        if self.endpoint is not None and not re.match(r"^https?://", self.endpoint):
            raise ValueError("`endpoint` must be an http(s) URL")
        return self

    @property
    def served_name(self) -> str:
        """The name requests use on the server."""
        model: str | None = getattr(self, "model", None)
        return model or self.name


class ModelMemberConfig(_Member):
    """A whole model on an OpenAI-compatible server (vLLM, or any other)."""

    kind: Literal["model"] = Field("model", description="A whole model (the default kind).")
    model: str = Field(description="The model name on that server.")

    @property
    def adapter(self) -> None:
        """A whole model has none (read alike on every kind; refused as a field here)."""
        return None


class LoRAMemberConfig(_Member):
    """A LoRA adapter on a vLLM server started with ``--enable-lora``; requests name the adapter."""

    kind: Literal["lora"] = Field(description="A PEFT LoRA adapter.")
    model: str | None = Field(None, description="The adapter's name on the server (default: the member name).")
    adapter: str | None = Field(None, description="The PEFT LoRA directory.")
    soup: SoupConfig | None = Field(
        None,
        description="Instead of `adapter`: a weighted merge of LoRA adapters, built by the gateway at start-up or "
        "reload into its cache (one folder per recipe and inputs, reused), then served like any LoRA. Its name on "
        "the server defaults to the member name plus the recipe's digest, so a changed recipe is served beside the "
        "old one until the swap.",
    )
    load: Literal["runtime", "startup"] = Field(
        "runtime",
        description="runtime: the gateway loads the adapter through vLLM's /v1/load_lora_adapter (and unloads it "
        "when the member goes); startup: the launched server loads it with --lora-modules.",
    )

    @model_validator(mode="after")
    def _source(self) -> LoRAMemberConfig:
        if (self.adapter is None) == (self.soup is None):
            raise ValueError("set exactly one of `adapter` or `soup`")
        if self.load == "startup" and self.server is None:
            raise ValueError("load: startup needs a `server` the gateway launches")
        return self


class SoftPromptMemberConfig(_Member):
    """A PEFT prompt-tuning checkpoint over a base model served with ``--enable-prompt-embeds``."""

    kind: Literal["soft_prompt"] = Field(description="A soft prompt (PEFT prompt tuning).")
    model: str = Field(description="The base model's name on its server.")
    adapter: str = Field(description="The prompt-tuning directory.")
    base_checkpoint: str | None = Field(
        None,
        description="The base model's directory or hub id (tokenizer and input embeddings). Default: the model "
        "of the member's `server`.",
    )

    @model_validator(mode="after")
    def _base(self) -> SoftPromptMemberConfig:
        if self.endpoint is not None and self.base_checkpoint is None:
            raise ValueError("a soft_prompt member on an `endpoint` needs `base_checkpoint`")
        return self


class LibraryAdapterMemberConfig(_Member):
    """A bottleneck or prefix-tuning adapter saved by the `adapters` library (``save_adapter``),
    served by an ``engine: adapters`` server of its base."""

    kind: Literal["bottleneck", "prefix"] = Field(description="bottleneck or prefix (the `adapters` library).")
    model: str | None = Field(None, description="On an `endpoint`: the adapter's name there.")
    adapter: str | None = Field(None, description="On a launched server: the adapter's save_adapter directory.")

    @model_validator(mode="after")
    def _source(self) -> LibraryAdapterMemberConfig:
        if self.server is not None and self.adapter is None:
            raise ValueError(f"a {self.kind} member on a launched server needs `adapter` (its save_adapter directory)")
        if self.endpoint is not None and self.model is None:
            raise ValueError(f"a {self.kind} member on an `endpoint` needs `model`: the adapter's name there")
        return self


def member_kind(value: object) -> str:
    kind = value.get("kind", "model") if isinstance(value, dict) else getattr(value, "kind", "model")
    return "adapters_library" if kind in ADAPTER_KINDS else str(kind)


MemberConfig = ModelMemberConfig | LoRAMemberConfig | SoftPromptMemberConfig | LibraryAdapterMemberConfig
"""One model of an ensemble, reached through an OpenAI-compatible API: one model per ``kind``, so
that a field a kind does not take is refused by name."""

AnyMemberConfig = Annotated[
    Annotated[ModelMemberConfig, Tag("model")]
    | Annotated[LoRAMemberConfig, Tag("lora")]
    | Annotated[SoftPromptMemberConfig, Tag("soft_prompt")]
    | Annotated[LibraryAdapterMemberConfig, Tag("adapters_library")],
    Discriminator(member_kind),
]


def member_config(data: dict[str, Any]) -> MemberConfig:
    """A member's config from its fields (the model its ``kind`` names)."""
    out: MemberConfig = _MEMBER.validate_python(data)
    return out


ADAPTER_KINDS = ("bottleneck", "prefix")


class ServerConfig(Strict):
    """A member server the gateway starts and supervises itself (single-node mode): vLLM, or the
    adapter server for bottleneck and prefix-tuning members."""

    name: Name = Field(description="Unique server name; members point at it with `server`.")
    model: str | None = Field(None, description="Model directory or hub id served by this server.")
    merge: str | dict[str, Any] | None = Field(
        None,
        description="Instead of `model`: a mergekit recipe (a YAML file, or the recipe inline), merged by the "
        "gateway with mergekit at start-up or reload into its cache (one folder per recipe and inputs, reused), "
        "then served.",
    )
    served_model_names: list[str] = Field(
        default_factory=list, description="Names the server answers to (default: the model; a merge: the server name)."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int | None = Field(None, ge=1, le=65535, description="Port; a free one when unset.")
    engine: Literal["vllm", "adapters"] = Field(
        "vllm",
        description="vllm: a vLLM server. adapters: the gateway's adapter server (service/adapterserver: "
        "transformers + the `adapters` library), which serves the bottleneck and prefix members pointing at it, "
        "run by `python`.",
    )
    python: str | None = Field(
        None,
        description="engine adapters: the interpreter of an environment with the `adapters` library (default: "
        "$ENSEMBLE_ADAPTERS_PYTHON, else .venv-adapters/bin/python, which `make adapters-env` builds).",
    )
    device: Device | None = Field(
        None, description="engine adapters: where the adapter server runs the model (default cpu)."
    )
    dtype: DType | None = Field(
        None, description="engine adapters: its weights' and activations' dtype (default float32)."
    )
    args: list[str] = Field(
        default_factory=list,
        description="Extra server arguments (vLLM's; for the adapter server e.g. --max-batch 8, --threads 2).",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    startup_timeout_s: float = Field(600.0, gt=0, description="How long to wait for /health.")

    @model_validator(mode="after")
    def _one_model(self) -> ServerConfig:
        if (self.model is None) == (self.merge is None):
            raise ValueError("set exactly one of `model` or `merge`")
        if self.engine == "vllm" and (self.device is not None or self.dtype is not None):
            field = "device" if self.device is not None else "dtype"
            raise ValueError(f"`{field}` is for `engine: adapters`; give a vLLM server --dtype (or --device) in `args`")
        return self

    @property
    def checkpoint(self) -> str:
        """The directory (or hub id) the server serves; for a merge, set once it is built."""
        if self.model is None:
            raise ValueError(f"server {self.name}: its merge is not built yet")
        return self.model


_MEMBER: TypeAdapter[MemberConfig] = TypeAdapter(AnyMemberConfig)
