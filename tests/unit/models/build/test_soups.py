"""Adapter soups and merged models: recipes checked (each bad recipe names its member or server),
soups built by PEFT's own add_weighted_adapter into a content-addressed cache, merges by mergekit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from service.config import GatewayConfig, LoRAMemberConfig, parse_config
from service.errors import ConfigError
from service.models.build import materialize as artifacts
from service.models.build import soups
from service.models.build.materialize import materialize

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def _base(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)  # type: ignore[no-untyped-call]
    return path


def _lora(base: Path, out: Path, rank: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soups")
    base, other = _base(root / "base", 0), _base(root / "other", 1)
    return {
        "base": base,
        "a": _lora(base, root / "a", 4, 1),
        "b": _lora(base, root / "b", 4, 2),
        "r8": _lora(base, root / "r8", 8, 3),
        "other": _lora(other, root / "on-other", 4, 4),
    }


def config(files: dict[str, Path], cache: Path, soup: dict[str, Any], max_rank: int = 8) -> str:
    data = {
        "cache_dir": str(cache),
        "servers": [
            {"name": "s", "model": str(files["base"]), "args": ["--enable-lora", "--max-lora-rank", str(max_rank)]}
        ],
        "members": [
            {"name": "la", "kind": "lora", "server": "s", "adapter": str(files["a"]), "load": "startup"},
            {"name": "mix", "kind": "lora", "server": "s", "load": "startup", "soup": soup},
        ],
        "ensembles": {"e": {"members": ["la", "mix"]}},
    }
    return yaml.safe_dump(data)


def linear(files: dict[str, Path], *names: str, method: str = "linear", **extra: Any) -> dict[str, Any]:
    return {"method": method, "adapters": [{"adapter": str(files[n]), "weight": 0.5} for n in names], **extra}


def build(text: str, check_only: bool = False) -> GatewayConfig:
    return materialize(parse_config(text), build=not check_only)


@pytest.mark.parametrize(
    ("soup", "error"),
    [
        ({"method": "average", "adapters": []}, r"members\.1 \(mix\)\.soup\.method"),
        (
            {"adapters": [{"adapter": "x", "weight": ".nan"}]},
            r"members\.1 \(mix\)\.soup\.adapters\.0\.weight: .*finite",
        ),
        ({"adapters": [{"adapter": "x", "weight": ".inf"}, {"adapter": "y"}]}, r"adapters\.0\.weight: .*finite"),
        ({"adapters": [{"adapter": "x"}]}, r"mix\)\.soup\.adapters: .*at least 2"),
        ({"method": "ties", "adapters": [{"adapter": "x"}, {"adapter": "y"}]}, r"mix\)\.soup: .*ties needs `density`"),
        ({"adapters": [{"adapter": "x", "member": "la"}, {"adapter": "y"}]}, r"exactly one of `adapter` or `member`"),
    ],
)
def test_bad_recipe_fields_name_the_member(files: dict[str, Path], tmp_path: Path, soup: Any, error: str) -> None:
    text = config(files, tmp_path, soup).replace("'.nan'", ".nan").replace("'.inf'", ".inf")
    with pytest.raises(ConfigError, match=error):
        parse_config(text)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (
            lambda f: linear(f, "a", "a") | {"adapters": [{"adapter": "/nowhere/x"}, {"adapter": str(f["a"])}]},
            r"members\.mix\.soup\.adapters\.0\.adapter: no adapter at /nowhere/x",
        ),
        (lambda f: linear(f, "a", "other"), r"members\.mix\.soup: adapters of different bases"),
        (lambda f: linear(f, "a", "r8"), r"members\.mix\.soup: method linear needs adapters of equal rank .*r=4.*r=8"),
        (lambda f: linear(f, "a", "r8", method="dare_ties", density=0.5), r"dare_ties needs adapters of equal rank"),
        (
            lambda f: linear(f, "a", "b") | {"adapters": [{"member": "nope"}, {"member": "la"}]},
            r"members\.mix\.soup\.adapters\.0\.member: 'nope' is not a lora member",
        ),
        (lambda f: linear(f, "a", "r8", method="cat"), r"members\.mix: adapter rank 12 exceeds server 's'"),
    ],
)
def test_bad_recipes_name_the_member_before_anything_is_built(
    files: dict[str, Path], tmp_path: Path, make: Callable[[dict[str, Path]], dict[str, Any]], error: str
) -> None:
    text = config(files, tmp_path / "cache", make(files))
    for check_only in (True, False):
        with pytest.raises(ConfigError, match=error):
            build(text, check_only)
    assert not (tmp_path / "cache").exists()


def test_a_soup_is_pefts_own_merge_cached_by_content(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts: list[dict[str, Any]] = [{"member": "la", "weight": 0.7}, {"adapter": str(files["b"]), "weight": 0.3}]
    soup = {"method": "linear", "adapters": parts}
    cfg = build(config(files, tmp_path, soup))
    mix = cfg.member("mix")
    assert mix.adapter is not None and Path(mix.adapter).parent == tmp_path / "soups"
    assert mix.served_name.startswith("mix-") and mix.served_name[4:] in Path(mix.adapter).name
    built = load_file(Path(mix.adapter) / "adapter_model.safetensors")

    # The same merge done here with PEFT directly.
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(files["base"]), str(files["a"]), adapter_name="a"
    )
    model.load_adapter(str(files["b"]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ref", combination_type="linear")
    model.save_pretrained(str(tmp_path / "ref"), selected_adapters=["ref"])
    ref = load_file(tmp_path / "ref" / "ref" / "adapter_model.safetensors")
    assert built.keys() == ref.keys() and len(built) > 0
    for key in ref:
        torch.testing.assert_close(built[key], ref[key], rtol=0, atol=0)
    assert not torch.equal(
        built[next(iter(built))], load_file(files["a"] / "adapter_model.safetensors")[next(iter(built))]
    )

    # Unchanged recipe and inputs: found in the cache, nothing built.
    def no_build(*_: Any) -> None:
        raise AssertionError("rebuilt an unchanged soup")

    monkeypatch.setattr(artifacts, "build_soup", no_build)
    assert build(config(files, tmp_path, soup)).member("mix").adapter == mix.adapter
    # A changed weight is another soup, in another folder; the old one stays.
    monkeypatch.undo()
    parts[1]["weight"] = 0.4
    again = build(config(files, tmp_path, soup)).member("mix")
    assert again.adapter != mix.adapter and again.served_name != mix.served_name
    assert Path(mix.adapter).exists() and Path(str(again.adapter)).exists()


@pytest.mark.parametrize("method", ["cat", "svd", "ties", "dare_linear", "dare_ties"])
def test_every_method_builds_and_dare_is_seeded(files: dict[str, Path], tmp_path: Path, method: str) -> None:
    extra = {"density": 0.5} if method in ("ties", "dare_linear", "dare_ties") else {}
    state = torch.random.get_rng_state()
    first = build(config(files, tmp_path / "one", linear(files, "a", "b", method=method, **extra), max_rank=16))
    assert torch.equal(torch.random.get_rng_state(), state), "the soup's seed leaked into torch's global generator"
    second = build(config(files, tmp_path / "two", linear(files, "a", "b", method=method, **extra), max_rank=16))
    one = load_file(Path(str(first.member("mix").adapter)) / "adapter_model.safetensors")
    two = load_file(Path(str(second.member("mix").adapter)) / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    rank = json.loads((Path(str(first.member("mix").adapter)) / "adapter_config.json").read_text())["r"]
    assert rank == (8 if method == "cat" else 4)


def test_soup_rank_follows_the_method(files: dict[str, Path]) -> None:
    cfg = parse_config(config(files, Path("/unused"), linear(files, "a", "r8", method="svd", svd_rank=6), max_rank=16))
    mix = cfg.member("mix")
    assert isinstance(mix, LoRAMemberConfig)
    assert soups.soup_rank(soups.soup_inputs(cfg, mix)) == 6


def merge_config(recipe: Any, cache: Path) -> str:
    data = {
        "cache_dir": str(cache),
        "servers": [{"name": "merged", "merge": recipe}],
        "members": [{"name": "m", "server": "merged", "model": "merged"}],
        "ensembles": {"e": {"members": ["m"]}},
    }
    return yaml.safe_dump(data)


def test_a_server_is_a_model_or_a_merge() -> None:
    for server in ({"name": "x"}, {"name": "x", "model": "m", "merge": {"merge_method": "linear"}}):
        text = yaml.safe_dump(
            {
                "servers": [server],
                "members": [{"name": "m", "server": "x", "model": "x"}],
                "ensembles": {"e": {"members": ["m"]}},
            }
        )
        with pytest.raises(ConfigError, match=r"servers\.0 \(x\): .*exactly one of `model` or `merge`"):
            parse_config(text)


@pytest.mark.parametrize(
    ("recipe", "error"),
    [
        (
            {"merge_method": "average", "models": [{"model": "{a}"}, {"model": "{b}"}]},
            r"servers\.merged\.merge\.merge_method: unknown method 'average'; mergekit knows \[.*'task_arithmetic'",
        ),
        ({"merge_method": "linear"}, r"servers\.merged\.merge: not a valid mergekit recipe"),
        (
            {"merge_method": "linear", "models": [{"model": "/nowhere/m"}, {"model": "{b}"}]},
            r"servers\.merged\.merge: model /nowhere/m not found",
        ),
        ("/nowhere/recipe.yaml", r"servers\.merged\.merge: cannot read the recipe /nowhere/recipe\.yaml"),
    ],
)
def test_bad_merge_recipes_name_the_server(files: dict[str, Path], tmp_path: Path, recipe: Any, error: str) -> None:
    if isinstance(recipe, dict) and "models" in recipe:
        recipe = json.loads(json.dumps(recipe).replace("{a}", str(files["base"])).replace("{b}", str(files["base"])))
    with pytest.raises(ConfigError, match=error):
        build(merge_config(recipe, tmp_path), check_only=True)


def test_a_merge_is_mergekits_linear_average_cached_by_content(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mergekit")
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(files["base"]), "parameters": {"weight": 0.5}},
            {"model": str(files["base"].parent / "other"), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    cfg = build(merge_config(recipe, tmp_path))
    server = cfg.servers[0]
    assert server.served_model_names == ["merged"] and server.model is not None
    out = Path(server.model)
    assert out.parent == tmp_path / "merges" and (out / "merge-recipe.yaml").exists()
    merged = load_file(out / "model.safetensors")
    a = load_file(files["base"] / "model.safetensors")
    b = load_file(files["base"].parent / "other" / "model.safetensors")
    assert merged.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(merged[key], 0.5 * (a[key] + b[key]))

    def no_build(*_: Any) -> None:
        raise AssertionError("merged an unchanged recipe again")

    monkeypatch.setattr(artifacts, "build_merge", no_build)
    assert build(merge_config(recipe, tmp_path)).servers[0].model == server.model
