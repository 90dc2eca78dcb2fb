"""How the gateway protects itself and its members: keys, limits, retries, breakers, health
checks, draining, logging."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from service.config.base import Name, Strict


class NamedKeyConfig(Strict):
    """A client key with a name: the name labels its metrics, its limits (``limits.keys``) and its
    answers in the store; the key itself is never shown."""

    env: str | None = Field(None, description="Env var holding the key (read at each load and reload).")
    key: str | None = Field(None, description="The key in the file (prefer `env`).")

    _value: str = PrivateAttr("")

    @model_validator(mode="after")
    def _read(self) -> NamedKeyConfig:
        if (self.env is None) == (self.key is None):
            raise ValueError("give exactly one of env or key")
        value = self.key if self.key is not None else os.environ.get(self.env or "", "").strip()
        if not value:
            raise ValueError(f"env: the variable {self.env} is unset or empty")
        self._value = value
        return self

    def value(self) -> str:
        return self._value


class AuthConfig(Strict):
    """API keys, checked as ``Authorization: Bearer KEY`` in constant time."""

    api_keys: list[str] = Field(default_factory=list, description="Keys written in the file (prefer the env).")
    keys: dict[Name, NamedKeyConfig] = Field(
        default_factory=dict,
        description="Named client keys: {name: {env: VAR}}. Their names label metrics, limits and the store.",
    )
    api_keys_env: str | None = Field(
        "GATEWAY_API_KEYS", description="Env var with comma-separated client keys. No keys at all: open."
    )
    admin_key_env: str | None = Field(
        "GATEWAY_ADMIN_KEY", description="Env var with the admin key for /admin/*. Unset: /admin is disabled."
    )
    protect_health: bool = Field(False, description="Require a client key for /health and /ready.")
    protect_metrics: bool = Field(False, description="Require a client key for /metrics.")

    _client_keys: list[str] = PrivateAttr(default_factory=list)
    _admin_key: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _read_env(self) -> AuthConfig:
        """The keys are read from the environment here, once per load or reload, not per request."""
        keys = list(self.api_keys)
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        self._client_keys = keys
        self._admin_key = (os.environ.get(self.admin_key_env) or None) if self.admin_key_env else None
        return self

    @model_validator(mode="after")
    def _names(self) -> AuthConfig:
        for name in self.keys:
            if name.startswith("key-"):
                raise ValueError(f"keys.{name}: names starting with 'key-' are kept for unnamed keys' ids")
        return self

    def client_keys(self) -> list[str]:
        """Every client key: the unnamed ones, then the named."""
        return [*self._client_keys, *(k.value() for k in self.keys.values())]

    def named_keys(self) -> list[tuple[str | None, str]]:
        """(name or None, key) for every client key."""
        return [*((None, k) for k in self._client_keys), *((n, k.value()) for n, k in self.keys.items())]

    def admin_key(self) -> str | None:
        return self._admin_key


class KeyLimits(Strict):
    """One client key's limits; an unset one does not limit. Tokens are the members' (prompt and
    completion, every member called): what an answer really spends."""

    requests_per_minute: int | None = Field(None, ge=1, description="Requests per minute (a burst of one minute's).")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Member tokens per minute; a request is refused while the last minute's are spent."
    )
    concurrent: int | None = Field(None, ge=1, description="Requests in progress at once.")


class LimitsConfig(Strict):
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
    per_key: KeyLimits | None = Field(
        None,
        description="Limits for each client key without its own entry in `keys` (each unnamed key on its own; "
        "without client keys, every caller together).",
    )
    keys: dict[Name, KeyLimits] = Field(
        default_factory=dict, description="Limits per named key (`auth.keys`): {name: {requests_per_minute: ...}}."
    )
    store: str | None = Field(
        None,
        description="Where the per-key counts live: `redis://host:port/db` (or rediss://, unix://) to share them "
        "across replicas; unset: in this process. Redis unreachable: each replica counts alone until it is back.",
    )
    store_timeout_s: float = Field(0.25, gt=0, le=10, description="Longest wait for Redis on one request.")
    store_retry_s: float = Field(5.0, gt=0, description="After Redis failed: how long before it is tried again.")

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None  # `store: ${LIMITS_STORE_URL:-}` with the variable unset: counted in process
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a Redis URL: redis://host:port/db, rediss://... or unix:///path.sock")
        return v


class RetryConfig(Strict):
    """Retries of a member call after a connection error or a 5xx, only within the request's deadline."""

    attempts: int = Field(3, ge=1, le=10, description="Calls at most, the first included (1: no retries).")
    backoff_s: float = Field(0.05, ge=0, description="Base of the exponential backoff; full jitter.")
    backoff_max_s: float = Field(1.0, ge=0, description="Largest backoff between two attempts.")


class BreakerConfig(Strict):
    """Per-member outlier ejection: after consecutive failures a member is skipped for a cool-down,
    then one request (or a passing health check) probes it."""

    failures: int = Field(5, ge=1, description="Consecutive failed calls that open the circuit.")
    cooldown_s: float = Field(10.0, gt=0, description="First cool-down; doubles while probes fail.")
    max_cooldown_s: float = Field(120.0, gt=0, description="Longest cool-down.")


class HealthCheckConfig(Strict):
    """Active health checks of every member (GET /v1/models; a LoRA member's adapter must be listed)."""

    interval_s: float = Field(5.0, ge=0, description="Seconds between rounds; 0 disables active checks.")
    timeout_s: float = Field(2.0, gt=0, description="A check slower than this fails.")
    failures: int = Field(2, ge=1, description="Consecutive failed checks that open the member's circuit.")


class ResilienceConfig(Strict):
    """What keeps a failing member, or a stopping gateway, from losing requests."""

    retries: RetryConfig = Field(default_factory=RetryConfig, description="Retries of a member call.")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="Per-member circuit breakers.")
    health_checks: HealthCheckConfig = Field(
        default_factory=HealthCheckConfig, description="Active health checks of the members."
    )
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


class LoggingConfig(Strict):
    """The gateway's own logs (launched servers log to files of their own)."""

    json_logs: bool = Field(True, alias="json", description="One JSON object per line.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    log_prompts: bool = Field(False, description="Log prompts and answers (debugging only).")
