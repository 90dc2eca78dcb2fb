"""Merged models: a server's model given as a mergekit recipe, merged by mergekit (linear,
task_arithmetic, ties, dare_ties, slerp, and whatever else mergekit registers), no arithmetic of our own.

``merge_inputs`` reads and checks a recipe (mergekit's own configuration model, its method
registry, the local models it names) and raises a ``ConfigError`` naming the server; ``build_merge``
runs ``ensemble-gateway merge`` in a child process (mergekit imports pandas and datasets, seeds
global generators and holds whole models: none of that belongs in the gateway's process) and moves
the output into place once it is complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from service.config import ServerConfig
from service.errors import ConfigError
from service.models.build.cache import publish, staging


@dataclass(frozen=True)
class MergeInputs:
    server: str
    recipe: dict[str, Any]
    models: tuple[str, ...]  # local directories the recipe reads (hub ids are left out)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(path)


def read_recipe(merge: str | dict[str, Any], field: str) -> dict[str, Any]:
    """The recipe as a mapping: ``merge`` itself, or the YAML file it names."""
    if isinstance(merge, dict):
        return merge
    try:
        data = yaml.safe_load(Path(merge).read_text())
    except OSError as e:
        raise ConfigError(f"{field}: cannot read the recipe {merge}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{field}: {merge} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {merge} must hold a mapping (a mergekit recipe)")
    return data


def parse_recipe(recipe: dict[str, Any], field: str) -> Any:
    """mergekit's ``MergeConfiguration`` of ``recipe``, its method checked against mergekit's registry."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge_methods import registry
    except ImportError as e:
        raise ConfigError(f"{field}: mergekit is not installed (pip install 'ensemble-gateway[combine]')") from e
    try:
        cfg = MergeConfiguration.model_validate(recipe)
    except (ValueError, RuntimeError) as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"{field}: not a valid mergekit recipe: {e}") from e
    known = sorted(m.spec.name for m in registry.registered_methods())
    if cfg.merge_method not in known:
        raise ConfigError(f"{field}.merge_method: unknown method {cfg.merge_method!r}; mergekit knows {known}")
    return cfg


def merge_inputs(server: ServerConfig) -> MergeInputs:
    """The merge of ``server``, read and checked; a ``ConfigError`` naming the server and field."""
    assert server.merge is not None
    field = f"servers.{server.name}.merge"
    recipe = read_recipe(server.merge, field)
    cfg = parse_recipe(recipe, field)
    models: list[str] = []
    for ref in cfg.referenced_models():
        for path in (ref.model.path, ref.lora.path if ref.lora else None):
            if path is None or not _looks_local(path):
                continue
            if not os.path.isdir(os.path.expanduser(path)):
                raise ConfigError(f"{field}: model {path} not found")
            models.append(os.path.expanduser(path))
    return MergeInputs(server.name, recipe, tuple(sorted(set(models))))


def run_merge_recipe(recipe: dict[str, Any], out: Path, device: str = "cpu") -> None:
    """mergekit's ``run_merge`` on ``recipe`` into ``out`` (the tokenizer copied), in this process."""
    from mergekit.merge import MergeOptions, run_merge

    cfg = parse_recipe(recipe, "recipe")
    try:
        run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=True, device=device, quiet=True))
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # mergekit's own checks raise these
        raise ConfigError(f"mergekit: {type(e).__name__}: {e}") from e
    _carry_generation_config(cfg, out)


def _carry_generation_config(cfg: Any, out: Path) -> None:
    """mergekit writes config.json and the tokenizer, not ``generation_config.json`` (the stop tokens vLLM
    reads): the base model's, else the first model's, is copied."""
    if (out / "generation_config.json").exists():
        return
    refs = ([cfg.base_model] if cfg.base_model else []) + list(cfg.referenced_models())
    for ref in refs:
        src = Path(os.path.expanduser(ref.model.path)) / "generation_config.json"
        if src.exists():
            shutil.copyfile(src, out / "generation_config.json")
            return


def build_merge(inputs: MergeInputs, out: Path, timeout_s: float = 3600.0) -> None:
    """Merge into ``out`` through ``ensemble-gateway merge`` in a child process; ``out`` appears only
    complete. Blocking: call it from a worker thread."""
    with staging(out) as tmp:
        recipe_path = tmp / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(inputs.recipe, sort_keys=False))
        model_dir = tmp / "model"
        cmd = [sys.executable, "-m", "service", "merge", str(recipe_path), str(model_dir)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ConfigError(f"servers.{inputs.server}.merge: mergekit did not finish in {timeout_s:.0f}s") from e
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise ConfigError(f"servers.{inputs.server}.merge: mergekit failed (exit {proc.returncode}):\n{tail}")
        shutil.copyfile(recipe_path, model_dir / "merge-recipe.yaml")
        publish(model_dir, out, "config.json")
