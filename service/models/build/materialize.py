"""What the gateway builds from recipes before it serves: merged models (``servers[].merge``) and
adapter soups (``members[].soup``), in a content-addressed cache.

``materialize`` turns a configuration with recipes into one that names built directories (a
merge server's ``model``, a soup member's ``adapter``), building what the cache lacks. A folder's
name is a digest of the recipe, the library that builds it and its inputs' files, so an unchanged
recipe is reused across restarts and reloads, and a changed one is built beside the old one, which
keeps serving until the swap. Blocking: ``serve`` calls it before the event loop starts, a reload
from a worker thread.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from service.config import (
    FuserConfig,
    GatewayConfig,
    LoRAMemberConfig,
    RankerConfig,
    ServerConfig,
    SoftPromptMemberConfig,
)
from service.errors import ConfigError
from service.members.checks import check_members
from service.models.build.cache import tree_fingerprint
from service.models.build.merges import build_merge, merge_inputs
from service.models.build.soups import build_soup, soup_inputs

logger = logging.getLogger(__name__)


def cache_root(config: GatewayConfig) -> Path:
    return config.cache_root()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _merge_server(server: ServerConfig, root: Path, build: bool) -> ServerConfig:
    inputs = merge_inputs(server)
    if not build:
        return server
    digest = _digest(
        {
            "mergekit": _version("mergekit"),
            "recipe": inputs.recipe,
            "models": {m: tree_fingerprint(m) for m in inputs.models},
        }
    )
    out = root / "merges" / digest
    if (out / "config.json").exists():
        logger.info("server %s: merge %s from the cache (%s)", server.name, digest, out)
    else:
        start = time.perf_counter()
        logger.info("server %s: merging with mergekit into %s", server.name, out)
        build_merge(inputs, out)
        logger.info("server %s: merged in %.1fs", server.name, time.perf_counter() - start)
    names = server.served_model_names or [server.name]
    return server.model_copy(update={"model": str(out), "served_model_names": names})


def _soup_member(config: GatewayConfig, member: LoRAMemberConfig, root: Path, build: bool) -> LoRAMemberConfig:
    inputs = soup_inputs(config, member)
    if not build:
        return member
    digest = _digest(
        {
            "peft": _version("peft"),
            "recipe": inputs.recipe.model_dump(exclude={"adapters"}),
            "parts": [(tree_fingerprint(p.adapter), p.weight) for p in inputs.parts],
        }
    )
    out = root / "soups" / digest
    if (out / "adapter_config.json").exists():
        logger.info("member %s: soup %s from the cache (%s)", member.name, digest, out)
    else:
        start = time.perf_counter()
        logger.info(
            "member %s: building its %s soup of %d adapters into %s",
            member.name,
            inputs.recipe.method,
            len(inputs.parts),
            out,
        )
        build_soup(inputs, out)
        logger.info("member %s: soup built in %.1fs", member.name, time.perf_counter() - start)
    # The digest in the served name: a changed soup loads beside the old one, which serves until the swap.
    return member.model_copy(update={"adapter": str(out), "model": member.model or f"{member.name}-{digest[:10]}"})


def materialize(config: GatewayConfig, build: bool = True) -> GatewayConfig:
    """``config`` with every merge and soup built (or found in the cache) and every member's files
    checked (``check_members``). ``build=False`` checks the recipes without building (check-config).
    A ``ConfigError`` names the server or member at fault. Idempotent: what is built stays built."""
    root = cache_root(config)
    servers = [_merge_server(s, root, build) if s.merge is not None and s.model is None else s for s in config.servers]
    config = config.model_copy(update={"servers": servers})
    members = [
        _soup_member(config, m, root, build) if isinstance(m, LoRAMemberConfig) and m.soup and not m.adapter else m
        for m in config.members
    ]
    config = config.model_copy(update={"members": members})
    check_model_runtime(config)
    check_members(config)
    return config


# What a model in this process needs: the `models` extra (a gateway image without it serves its
# rankers and fusers from the model tier).
MODEL_RUNTIME = ("torch", "transformers")


def local_models(config: GatewayConfig) -> list[str]:
    """The fields whose models would run in this process: local rankers and GenFusers, encoder
    routers, soft-prompt members (their prompt_embeds are built here)."""
    fields = [f"rankers.{n}" for n, r in config.rankers.items() if isinstance(r, RankerConfig)]
    fields += [f"fusers.{n}" for n, f in config.fusers.items() if isinstance(f, FuserConfig)]
    fields += [f"routers.{n}" for n, r in config.routers.items() if r.kind == "encoder"]
    fields += [f"members.{m.name}" for m in config.members if isinstance(m, SoftPromptMemberConfig)]
    return fields


def check_model_runtime(config: GatewayConfig) -> None:
    """Refuse, naming the field, a model that would run here when torch or transformers is not
    installed (rather than an ImportError halfway through loading)."""
    missing = [name for name in MODEL_RUNTIME if importlib.util.find_spec(name) is None]
    fields = local_models(config) if missing else []
    if fields:
        raise ConfigError(
            f"{fields[0]}: runs in this process, which lacks {' and '.join(missing)}: install the models extra "
            "(pip install 'ensemble-gateway[models]'), or serve it on the model tier (an `endpoint:` for a ranker "
            "or fuser; see README, The model tier)"
        )
