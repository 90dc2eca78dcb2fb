"""The model tier's own configuration (``ensemble-gateway serve-models``); a gateway's ranker or
fuser names a model served there with ``models.RemoteModelConfig``."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from service.config.base import Name, Strict
from service.config.models import FuserConfig, RankerConfig


class TierConfig(Strict):
    """``ensemble-gateway serve-models --config FILE``: the rankers and fusers it loads and serves."""

    rankers: dict[Name, RankerConfig] = Field(default_factory=dict, description="PairRM rankers by name.")
    fusers: dict[Name, FuserConfig] = Field(default_factory=dict, description="GenFusers by name.")
    api_keys_env: str | None = Field(
        "MODEL_TIER_API_KEYS", description="Env var with comma-separated keys the gateways send. Unset or empty: open."
    )
    torch_threads: int | None = Field(None, ge=1, description="torch's intra-op threads (default: torch's).")
    cache_dir: str | None = Field(None, description="Where converted checkpoints are kept (the gateway's default).")

    @model_validator(mode="after")
    def _some(self) -> TierConfig:
        if not self.rankers and not self.fusers:
            raise ValueError("rankers, fusers: the tier serves at least one model")
        return self

    def cache_root(self) -> Path:
        if self.cache_dir:
            return Path(os.path.expanduser(self.cache_dir))
        return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "ensemble-gateway"
