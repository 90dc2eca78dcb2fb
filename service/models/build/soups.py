"""Adapter soups (AdapterSoup): a LoRA adapter built as a weighted merge of LoRA adapters with PEFT's
``add_weighted_adapter``, no arithmetic of our own.

``soup_inputs`` checks a recipe against the adapters' files (cheap: their ``adapter_config.json``)
and raises a ``ConfigError`` naming the member; ``build_soup`` runs PEFT (it loads the base model
once, in its own dtype) and writes a PEFT adapter directory that vLLM loads like any LoRA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import GatewayConfig, LoRAMemberConfig
from service.config.members import EQUAL_RANK_METHODS, SoupConfig
from service.errors import ConfigError
from service.members.checks import check_lora_server, read_adapter_dir
from service.models.build.cache import publish, staging

SOUP_NAME = "soup"


@dataclass(frozen=True)
class SoupPartInput:
    """One adapter of a soup, resolved: where it is, its weight, what it says of itself."""

    label: str  # how errors name it: the member it came from, or its path
    adapter: str
    weight: float
    rank: int
    base: str


@dataclass(frozen=True)
class SoupInputs:
    member: str
    recipe: SoupConfig
    parts: tuple[SoupPartInput, ...]
    base: str  # the base model PEFT loads to build the soup


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def soup_inputs(config: GatewayConfig, member: LoRAMemberConfig) -> SoupInputs:
    """The soup of ``member`` resolved and checked; a ``ConfigError`` naming the member and field."""
    assert member.soup is not None
    where = f"members.{member.name}.soup"
    parts: list[SoupPartInput] = []
    for i, part in enumerate(member.soup.adapters):
        field = f"{where}.adapters.{i}"
        if part.member is not None:
            ref = next((m for m in config.members if m.name == part.member), None)
            if not isinstance(ref, LoRAMemberConfig) or ref.adapter is None or ref.soup is not None:
                raise ConfigError(f"{field}.member: {part.member!r} is not a lora member with an `adapter`")
            path, label = ref.adapter, part.member
        else:
            assert part.adapter is not None
            path, label = part.adapter, part.adapter
        cfg = read_adapter_dir(path, f"{field}.{'member' if part.member else 'adapter'}")
        if cfg.get("peft_type") != "LORA":
            raise ConfigError(f"{field}: {label} is a {cfg.get('peft_type')} adapter, not LORA")
        base = str(cfg.get("base_model_name_or_path"))
        parts.append(SoupPartInput(label, path, part.weight, int(cfg.get("r", 0)), base))
    first = parts[0]
    for p in parts[1:]:
        if not _same_path(p.base, first.base):
            raise ConfigError(
                f"{where}: adapters of different bases: {first.label} is over {first.base}, {p.label} over {p.base}"
            )
    method = member.soup.method
    if method in EQUAL_RANK_METHODS and len({p.rank for p in parts}) > 1:
        ranks = ", ".join(f"{p.label} r={p.rank}" for p in parts)
        raise ConfigError(f"{where}: method {method} needs adapters of equal rank ({ranks}); cat and svd take any")
    base = first.base
    server = next((s for s in config.servers if s.name == member.server), None)
    if server is not None and server.model is not None:
        base = server.model  # what the server runs: the adapters' recorded base may be another machine's path
    inputs = SoupInputs(member.name, member.soup, tuple(parts), base)
    check_lora_server(member, soup_rank(inputs), server)  # the rank the soup will have, before it is built
    return inputs


def soup_rank(inputs: SoupInputs) -> int:
    """The rank of the adapter PEFT will write (cat adds the ranks up; svd keeps svd_rank or the largest)."""
    ranks = [p.rank for p in inputs.parts]
    if inputs.recipe.method == "cat":
        return sum(ranks)
    if inputs.recipe.method == "svd":
        return inputs.recipe.svd_rank or max(ranks)
    return ranks[0]


def build_soup(inputs: SoupInputs, out: Path) -> None:
    """Run PEFT's ``add_weighted_adapter`` and write the result into ``out`` (atomically: a folder
    next to it is renamed into place). Blocking: call it from a worker thread."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from peft import PeftModel
    except ImportError as e:
        hint = "pip install 'ensemble-gateway[combine]'"
        raise ConfigError(f"members.{inputs.member}.soup: PEFT is not installed ({hint})") from e

    recipe = inputs.recipe
    # Loading the base and the adapters draws from torch's global generator, and dare draws its drop
    # mask from it: seeded here, restored afterwards (the gateway's own sampling is not disturbed).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        try:
            base = AutoModelForCausalLM.from_pretrained(inputs.base, dtype="auto")
            names = [f"part{i}" for i in range(len(inputs.parts))]
            model = PeftModel.from_pretrained(base, inputs.parts[0].adapter, adapter_name=names[0])
            for name, part in zip(names[1:], inputs.parts[1:], strict=True):
                model.load_adapter(part.adapter, adapter_name=name)
            kwargs: dict[str, Any] = {"combination_type": recipe.method}
            if recipe.density is not None:
                kwargs.update(density=recipe.density, majority_sign_method=recipe.majority_sign_method)
            if recipe.method == "svd":
                kwargs["svd_rank"] = recipe.svd_rank
            model.add_weighted_adapter(names, [p.weight for p in inputs.parts], SOUP_NAME, **kwargs)
        except (ValueError, TypeError, RuntimeError, OSError) as e:
            raise ConfigError(f"members.{inputs.member}.soup: PEFT could not build it: {e}") from e
    with staging(out) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=[SOUP_NAME])
        publish(tmp / SOUP_NAME, out, "adapter_config.json")
