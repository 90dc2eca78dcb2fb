"""How the gateway protects itself and its members: keys, limits, retries, breakers, health
checks, draining, logging."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from service.config.base import Strict


class AuthConfig(Strict):
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

    def client_keys(self) -> list[str]:
        return self._client_keys

    def admin_key(self) -> str | None:
        return self._admin_key


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
