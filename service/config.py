"""The gateway's configuration: a YAML file validated in full before anything starts.

``${VAR}`` and ``${VAR:-default}`` in the file are replaced from the environment before parsing,
so one file serves the demo, the tests and a deployment. Every error names the field it is about.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from service.errors import ConfigError

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Strict):
    """Sampling defaults of a member; a request's own values override them."""

    max_tokens: int = Field(128, ge=1, le=32768, description="Tokens to generate at most.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, description="Sampling seed, if the member should be repeatable.")


class MemberConfig(_Strict):
    """One model of an ensemble, reached through an OpenAI-compatible API.

    Kinds: ``model`` (a whole model), ``lora`` (a LoRA adapter on a server started with
    ``--enable-lora``) and ``soft_prompt`` (a PEFT prompt-tuning checkpoint over a base model served
    with ``--enable-prompt-embeds``). All take the same sampling settings and report the same metrics.
    """

    name: Name = Field(description="Unique member name, used in responses and metrics.")
    kind: Literal["model", "lora", "soft_prompt"] = Field("model", description="What this member is.")
    endpoint: str | None = Field(None, description="Base URL of an OpenAI-compatible server, e.g. http://host:8000/v1.")
    server: Name | None = Field(None, description="Name of a server under `servers` instead.")
    model: str | None = Field(
        None,
        description="The model name on that server. For `lora`: the adapter's name there (default: "
        "the member name); for `soft_prompt`: the base model's name.",
    )
    adapter: str | None = Field(
        None, description="`lora`: the PEFT LoRA directory; `soft_prompt`: the prompt-tuning directory."
    )
    load: Literal["runtime", "startup"] = Field(
        "runtime",
        description="`lora` only. runtime: the gateway loads the adapter through vLLM's "
        "/v1/load_lora_adapter (and unloads it when the member goes); startup: the launched server "
        "loads it with --lora-modules.",
    )
    base_checkpoint: str | None = Field(
        None,
        description="`soft_prompt` only: the base model's directory or hub id (tokenizer and input "
        "embeddings). Default: the model of the member's `server`.",
    )
    api: Literal["chat", "completions"] = Field(
        "chat", description="chat: /chat/completions with messages; completions: raw prompt."
    )
    system_prompt: str | None = Field(None, description="System message prepended for this member.")
    sampling: Sampling = Field(default_factory=Sampling)
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Per-call timeout for this member.")
    api_key_env: str | None = Field(None, description="Env var holding this member's API key.")

    @model_validator(mode="after")
    def _one_target(self) -> MemberConfig:
        if (self.endpoint is None) == (self.server is None):
            raise ValueError("set exactly one of `endpoint` or `server`")
        if self.endpoint is not None and not re.match(r"^https?://", self.endpoint):
            raise ValueError("`endpoint` must be an http(s) URL")
        if self.kind == "model" and self.model is None:
            raise ValueError("`model` is required")
        if self.kind == "model" and self.adapter is not None:
            raise ValueError("`adapter` is only for kinds lora and soft_prompt")
        if self.kind in ("lora", "soft_prompt") and self.adapter is None:
            raise ValueError(f"a {self.kind} member needs `adapter`")
        if self.kind == "soft_prompt" and self.model is None:
            raise ValueError("a soft_prompt member needs `model`: the base model's name on its server")
        if self.kind == "soft_prompt" and self.endpoint is not None and self.base_checkpoint is None:
            raise ValueError("a soft_prompt member on an `endpoint` needs `base_checkpoint`")
        if self.kind == "lora" and self.load == "startup" and self.server is None:
            raise ValueError("load: startup needs a `server` the gateway launches")
        return self

    @property
    def served_name(self) -> str:
        """The name requests use on the server."""
        return self.model or self.name


class ServerConfig(_Strict):
    """A vLLM server the gateway starts and supervises itself (single-node mode)."""

    name: Name
    model: str = Field(description="Model directory or hub id served by this server.")
    served_model_names: list[str] = Field(
        default_factory=list, description="Names the server answers to (default: the model)."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int | None = Field(None, ge=1, le=65535, description="Port; a free one when unset.")
    args: list[str] = Field(default_factory=list, description="Extra vLLM arguments.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    startup_timeout_s: float = Field(600.0, gt=0, description="How long to wait for /health.")


class RankerConfig(_Strict):
    """A PairRM ranker (PairRM-hf format: a directory or hub id)."""

    kind: Literal["pairrm"] = "pairrm"
    checkpoint: str
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    source_max_length: int = Field(1224, ge=8)
    candidate_max_length: int = Field(412, ge=8)
    aggregation: Literal["max_logits", "max_wins"] = "max_logits"
    max_batch_pairs: int = Field(32, ge=1, description="Pairs per forward pass at most.")
    scheme: Literal["full", "tournament", "bubble", "topk"] = Field(
        "full",
        description="Which pairs are compared. full: every ordered pair, llm-blender's scores (exact). "
        "Opt-in and cheaper, the scores then only order the candidates: tournament (a knockout, the best in "
        "2(n-1) comparisons, in about log2(n) rounds), bubble (one bubble pass, 2(n-1) comparisons in n-1 "
        "rounds), topk (the knockout, then replays among those beaten only by the selected, to select "
        "`select_k` in order).",
    )
    select_k: int = Field(3, ge=1, description="topk scheme: candidates selected in order (the ensemble's top_k).")
    max_batch_tokens: int = Field(
        16384, ge=64, description="Padded tokens (pairs x longest pair) per forward pass at most."
    )
    packed: bool = Field(
        True,
        description="Run pairs through the gateway's packed DeBERTa forward (same weights and arithmetic, no "
        "padding computed, only the relative positions that occur); false, or a checkpoint it does not "
        "support: transformers' forward on padded batches.",
    )
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long the batching worker, woken by a request, waits for others to share its forwards.",
    )


class FuserConfig(_Strict):
    """A GenFuser: a seq2seq checkpoint fed the top-k candidates in llm-blender's format."""

    kind: Literal["genfuser"] = "genfuser"
    checkpoint: str
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_length: int = Field(1024, ge=16)
    candidate_max_length: int = Field(128, ge=1)
    num_beams: int = Field(4, ge=1, le=16)
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
    lean_decode: bool = Field(
        True,
        description="For a T5 fuser, beam search runs in service/t5decode.py: transformers' beam search "
        "(same steps, same output tokens) on the model's weights with plain torch operations, the "
        "cross-attention keys and values computed once for all beams, without transformers' per-step "
        "module, cache and bookkeeping overhead. Settings it does not implement fall back to "
        "transformers' generate. False: transformers' generate always.",
    )


DEFAULT_AGGREGATION_TEMPLATE = """\
You have been given responses from several models to the user's request below, ranked best \
first. Synthesize them into one better response: weigh what they say critically, since some of \
it may be biased or wrong; keep what is correct and useful; do not simply copy one of them or \
mention that there were several. Reply with the response only.

{instruction_block}Responses, best first:
{candidates}"""

_TEMPLATE_FIELDS = {"instruction", "instruction_block", "input", "candidates"}


class LLMFuserConfig(_Strict):
    """A fuser that asks an OpenAI-compatible model to synthesize the ranked candidates
    (Mixture-of-Agents style). The template becomes the system message; the user's input is the
    user message. Template fields: {instruction}, {instruction_block}, {input}, {candidates}."""

    kind: Literal["llm"]
    endpoint: str | None = Field(None, description="Base URL of an OpenAI-compatible server.")
    server: Name | None = Field(None, description="Name of a server under `servers` instead.")
    model: str = Field(description="The model name on that server.")
    template: str = Field(DEFAULT_AGGREGATION_TEMPLATE, description="The aggregation prompt.")
    sampling: Sampling = Field(default_factory=Sampling)
    timeout_s: float = Field(120.0, gt=0, le=3600)
    api_key_env: str | None = None

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


def _fuser_kind(value: object) -> str:
    kind = value.get("kind", "genfuser") if isinstance(value, dict) else getattr(value, "kind", "genfuser")
    return str(kind)


AnyFuserConfig = Annotated[
    Annotated[FuserConfig, Tag("genfuser")] | Annotated[LLMFuserConfig, Tag("llm")],
    Discriminator(_fuser_kind),
]


class EnsembleConfig(_Strict):
    """A named ensemble: which members answer, and how they are ranked and fused."""

    members: list[Name] = Field(min_length=1)
    ranker: Name | None = Field(None, description="Ranker name; none: candidates keep their order.")
    fuser: Name | None = Field(None, description="Fuser name; none: the top candidate is returned.")
    top_k: int = Field(3, ge=1, description="Candidates given to the fuser.")
    fusion: Literal["always", "adaptive", "never"] = Field(
        "always",
        description="adaptive: skip the fuser and return the top candidate when its score leads the "
        "runner-up's by at least `fusion_margin` (or when only one candidate arrived).",
    )
    fusion_margin: float = Field(
        1.0, ge=0, description="adaptive fusion: the lead in ranker score that makes fusion unnecessary."
    )
    min_candidates: int = Field(1, ge=1, description="Candidates needed to answer at all.")
    deadline_s: float = Field(
        120.0, gt=0, le=3600, description="Whole-request deadline; a request's `deadline_s` may only shorten it."
    )
    members_share: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Share of the deadline the fan-out may use; the rest is kept for ranking and fusion.",
    )
    quorum: int | None = Field(
        None,
        ge=1,
        description="Answers after which the gateway stops waiting for stragglers once `straggler_ratio` has "
        "passed too. Default: a majority of the members (at least `min_candidates`).",
    )
    straggler_ratio: float = Field(
        1.0,
        ge=0,
        description="Once the quorum has answered after t seconds, wait at most t * ratio more for the rest "
        "(0: rank as soon as the quorum is in).",
    )
    straggler_min_s: float = Field(
        0.05, ge=0, description="The stragglers' wait is at least this long (scheduling jitter is not lateness)."
    )
    instruction: str = Field("", description="Default instruction for ranking and fusion.")

    @model_validator(mode="after")
    def _bounds(self) -> EnsembleConfig:
        if len(set(self.members)) != len(self.members):
            raise ValueError("members must not repeat")
        if self.min_candidates > len(self.members):
            raise ValueError("min_candidates exceeds the number of members")
        if self.quorum is not None and self.quorum > len(self.members):
            raise ValueError("quorum exceeds the number of members")
        return self

    @property
    def effective_quorum(self) -> int:
        return max(self.min_candidates, self.quorum or len(self.members) // 2 + 1)


class AuthConfig(_Strict):
    """API keys, checked as ``Authorization: Bearer KEY`` in constant time."""

    api_keys: list[str] = Field(default_factory=list, description="Keys written in the file (prefer the env).")
    api_keys_env: str | None = Field(
        "GATEWAY_API_KEYS", description="Env var with comma-separated client keys. No keys at all: open."
    )
    admin_key_env: str | None = Field(
        "GATEWAY_ADMIN_KEY", description="Env var with the admin key for /admin/*. Unset: /admin is disabled."
    )
    protect_health: bool = Field(False, description="Require a client key for /health and /ready.")
    protect_metrics: bool = Field(False, description="Require a client key for /metrics.")

    def client_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        return keys

    def admin_key(self) -> str | None:
        return (os.environ.get(self.admin_key_env) or None) if self.admin_key_env else None


class LimitsConfig(_Strict):
    """Request limits; exceeding one is a clear 4xx naming it."""

    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request body size (413 beyond).")
    max_prompt_chars: int = Field(100_000, ge=1, description="Characters of prompt, messages and instruction.")
    max_messages: int = Field(128, ge=1, description="Messages in one conversation.")
    max_tokens: int = Field(4096, ge=1, description="Largest `max_tokens` a request may ask for.")
    max_in_flight: int = Field(64, ge=1, description="Ensemble requests served at once; more wait in the queue.")
    max_queue: int = Field(
        128, ge=0, description="Requests waiting for a slot at most; beyond it, 429 with Retry-After at once."
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a slot (bounded by the request's deadline), then 429."
    )
    retry_after_s: int = Field(1, ge=1, description="The Retry-After a shed request is told.")


class RetryConfig(_Strict):
    """Retries of a member call after a connection error or a 5xx, only within the request's deadline."""

    attempts: int = Field(3, ge=1, le=10, description="Calls at most, the first included (1: no retries).")
    backoff_s: float = Field(0.05, ge=0, description="Base of the exponential backoff; full jitter.")
    backoff_max_s: float = Field(1.0, ge=0, description="Largest backoff between two attempts.")


class BreakerConfig(_Strict):
    """Per-member outlier ejection: after consecutive failures a member is skipped for a cool-down,
    then one request (or a passing health check) probes it."""

    failures: int = Field(5, ge=1, description="Consecutive failed calls that open the circuit.")
    cooldown_s: float = Field(10.0, gt=0, description="First cool-down; doubles while probes fail.")
    max_cooldown_s: float = Field(120.0, gt=0, description="Longest cool-down.")


class HealthCheckConfig(_Strict):
    """Active health checks of every member (GET /v1/models; a LoRA member's adapter must be listed)."""

    interval_s: float = Field(5.0, ge=0, description="Seconds between rounds; 0 disables active checks.")
    timeout_s: float = Field(2.0, gt=0, description="A check slower than this fails.")
    failures: int = Field(2, ge=1, description="Consecutive failed checks that open the member's circuit.")


class ResilienceConfig(_Strict):
    retries: RetryConfig = Field(default_factory=RetryConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    health_checks: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    drain_grace_s: float = Field(
        2.0,
        ge=0,
        description="On SIGTERM: how long the gateway keeps listening while it answers new requests with 503 "
        "and `Connection: close` (and /ready fails), so that clients and load balancers move away first.",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="Then: how long requests in flight may still finish before the gateway stops."
    )
    restart_servers: bool = Field(True, description="Single-node mode: restart a launched server that died.")
    restart_backoff_s: float = Field(2.0, gt=0, description="First wait before a restart; doubles up to 120 s.")


class LoggingConfig(_Strict):
    json_logs: bool = Field(True, alias="json", description="One JSON object per line.")
    level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = Field(False, description="Log prompts and answers (debugging only).")


class GatewayConfig(_Strict):
    """The whole file."""

    members: list[MemberConfig] = Field(min_length=1)
    servers: list[ServerConfig] = Field(default_factory=list)
    rankers: dict[Name, RankerConfig] = Field(default_factory=dict)
    fusers: dict[Name, AnyFuserConfig] = Field(default_factory=dict)
    ensembles: dict[Name, EnsembleConfig] = Field(min_length=1)
    default_ensemble: Name | None = Field(None, description="Default: the first ensemble.")
    max_connections: int = Field(256, ge=1, description="HTTP connections to members at most.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Intra-op CPU threads for the gateway's own model work (ranker, fuser); default: torch's, "
        "one per core. On a CPU shared with the members (vLLM-CPU), fewer is faster: each model thread gets "
        "its own OpenMP team, and the teams wait on each other and on the members' threads.",
    )
    member_http: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="Transport under the members' httpx client: aiohttp's pool (fast under concurrency) "
        "or httpx's own.",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    isolate_prompt_embeds: bool = Field(
        True,
        description="Never let soft-prompt (prompt_embeds) requests and token requests run at once "
        "on the same server: vLLM crashes on such batches when LoRA is enabled too (vllm#51122).",
    )

    @field_validator("members")
    @classmethod
    def _unique_members(cls, v: list[MemberConfig]) -> list[MemberConfig]:
        names = [m.name for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate member names: {sorted(dup)}")
        return v

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        servers = {s.name for s in self.servers}
        if len(servers) != len(self.servers):
            raise ValueError("servers: duplicate server names")
        ports = [s.port for s in self.servers if s.port is not None]
        if len(set(ports)) != len(ports):
            raise ValueError("servers: two servers share a port")
        for i, m in enumerate(self.members):
            if m.server is not None and m.server not in servers:
                raise ValueError(f"members.{i}.server: unknown server {m.server!r}")
        for name, f in self.fusers.items():
            if isinstance(f, LLMFuserConfig) and f.server is not None and f.server not in servers:
                raise ValueError(f"fusers.{name}.server: unknown server {f.server!r}")
        members = {m.name for m in self.members}
        for name, e in self.ensembles.items():
            for mname in e.members:
                if mname not in members:
                    raise ValueError(f"ensembles.{name}.members: unknown member {mname!r}")
            if e.ranker is not None and e.ranker not in self.rankers:
                raise ValueError(f"ensembles.{name}.ranker: unknown ranker {e.ranker!r}")
            if e.fuser is not None and e.fuser not in self.fusers:
                raise ValueError(f"ensembles.{name}.fuser: unknown fuser {e.fuser!r}")
        if self.default_ensemble is not None and self.default_ensemble not in self.ensembles:
            raise ValueError(f"default_ensemble: unknown ensemble {self.default_ensemble!r}")
        return self

    @property
    def default(self) -> str:
        return self.default_ensemble or next(iter(self.ensembles))

    def member(self, name: str) -> MemberConfig:
        return next(m for m in self.members if m.name == name)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, env: dict[str, str] | None = None) -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}``; an unset variable without default is an error."""
    env = dict(os.environ) if env is None else env

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set and has no default")

    return _VAR.sub(sub, text)


def _expand_values(data: Any) -> Any:
    """``expand_env`` on every string value after parsing: comments are left alone, and a variable's
    value cannot change the YAML's structure."""
    if isinstance(data, str):
        return expand_env(data)
    if isinstance(data, list):
        return [_expand_values(v) for v in data]
    if isinstance(data, dict):
        return {k: _expand_values(v) for k, v in data.items()}
    return data


def parse_config(text: str, source: str = "<config>") -> GatewayConfig:
    """Parse and validate; raise ``ConfigError`` naming the offending field."""
    try:
        data = _expand_values(yaml.safe_load(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration:\n" + "\n".join(lines)) from e


def load_config(path: str | Path) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    return parse_config(text, str(p))
