"""The gateway's configuration: a YAML file validated in full before anything starts.

Every field has a default and a description; every error names the field it is about. The models
live by subject (``members``, ``models``, ``policies``, ``gateway``); ``loading`` reads the file and
expands ``${VAR}`` / ``${VAR:-default}`` in its values after parsing. Environment variables the
config points at (API keys) are read once, when the file is loaded or reloaded.
"""

from service.config.base import Name, Strict, package_version
from service.config.gateway import EnsembleConfig, GatewayConfig
from service.config.loading import expand_env, load_config, load_tier_config, parse_config, parse_tier_config
from service.config.members import (
    ADAPTER_KINDS,
    LibraryAdapterMemberConfig,
    LoRAMemberConfig,
    MemberConfig,
    ModelMemberConfig,
    Sampling,
    ServerConfig,
    SoftPromptMemberConfig,
    member_config,
)
from service.config.models import (
    DEFAULT_AGGREGATION_TEMPLATE,
    AnyFuserConfig,
    AnyRankerConfig,
    FuserConfig,
    LLMFuserConfig,
    RankerConfig,
    RemoteModelConfig,
)
from service.config.policies import (
    AuthConfig,
    BreakerConfig,
    HealthCheckConfig,
    KeyLimits,
    LimitsConfig,
    LoggingConfig,
    NamedKeyConfig,
    ResilienceConfig,
    RetryConfig,
)
from service.config.routing import CascadeConfig, RouteConfig, RouterConfig
from service.config.store import StoreConfig
from service.config.tier import TierConfig

__all__ = [
    "ADAPTER_KINDS",
    "DEFAULT_AGGREGATION_TEMPLATE",
    "AnyFuserConfig",
    "AnyRankerConfig",
    "AuthConfig",
    "BreakerConfig",
    "CascadeConfig",
    "EnsembleConfig",
    "FuserConfig",
    "GatewayConfig",
    "HealthCheckConfig",
    "KeyLimits",
    "LLMFuserConfig",
    "LibraryAdapterMemberConfig",
    "LimitsConfig",
    "LoRAMemberConfig",
    "LoggingConfig",
    "MemberConfig",
    "ModelMemberConfig",
    "Name",
    "NamedKeyConfig",
    "RankerConfig",
    "RemoteModelConfig",
    "ResilienceConfig",
    "RetryConfig",
    "RouteConfig",
    "RouterConfig",
    "Sampling",
    "ServerConfig",
    "SoftPromptMemberConfig",
    "StoreConfig",
    "Strict",
    "TierConfig",
    "expand_env",
    "load_config",
    "load_tier_config",
    "member_config",
    "package_version",
    "parse_config",
    "parse_tier_config",
]
