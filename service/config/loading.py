"""Reading the file: YAML, then ``${VAR}`` / ``${VAR:-default}`` expanded in the parsed string
values (not in comments, and a value cannot change the YAML's structure), then validation. Every
error names the field it is about."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from service.config.gateway import GatewayConfig
from service.config.members import member_kind
from service.config.models import fuser_kind, ranker_kind
from service.config.tier import TierConfig
from service.errors import ConfigError

Config = TypeVar("Config", GatewayConfig, TierConfig)

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
    return _parse(GatewayConfig, text, source)


def parse_tier_config(text: str, source: str = "<config>") -> TierConfig:
    """The model tier's configuration (``serve-models``), parsed as ``parse_config`` parses the gateway's."""
    return _parse(TierConfig, text, source)


def load_tier_config(path: str | Path) -> TierConfig:
    return parse_tier_config(_read(Path(path)), str(path))


def _parse(model: type[Config], text: str, source: str) -> Config:
    try:
        data = _expand_values(yaml.safe_load(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            parts = _without_union_tag([str(p) for p in err["loc"]], data)
            # members.3 -> members.3 (soup-x): the member's or server's name, where the file gives one
            if len(parts) >= 2 and parts[0] in ("members", "servers") and parts[1].isdigit():
                name = _name_at(data, parts[0], int(parts[1]))
                if name:
                    parts[1] = f"{parts[1]} ({name})"
            loc = ".".join(parts) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration:\n" + "\n".join(lines)) from e


def _without_union_tag(parts: list[str], data: dict[str, Any]) -> list[str]:
    """pydantic names the kind's model in a member's or fuser's error location (members.0.lora.adapter);
    the file has no such level, so it goes (members.0.adapter)."""
    if len(parts) < 3:
        return parts
    item: object = None
    if parts[0] == "members" and parts[1].isdigit() and isinstance(data.get("members"), list):
        members = data["members"]
        item = members[int(parts[1])] if int(parts[1]) < len(members) else None
        tag = member_kind(item)
    elif parts[0] == "fusers" and isinstance(data.get("fusers"), dict):
        item = data["fusers"].get(parts[1])
        tag = fuser_kind(item)
    elif parts[0] == "rankers" and isinstance(data.get("rankers"), dict):
        item = data["rankers"].get(parts[1])
        tag = ranker_kind(item)
    else:
        return parts
    return [*parts[:2], *parts[3:]] if parts[2] == tag else parts


def _name_at(data: dict[str, Any], section: str, index: int) -> str | None:
    items = data.get(section)
    if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
        name = items[index].get("name")
        return name if isinstance(name, str) else None
    return None


def load_config(path: str | Path) -> GatewayConfig:
    return parse_config(_read(Path(path)), str(path))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
