"""Adapter misconfigurations are start-up errors that name the member."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.cli import main
from service.config import parse_config
from service.errors import ConfigError
from service.members.checks import check_lora_slots, check_members, startup_server_args
from service.models.fusers.llm import aggregation_messages


@pytest.fixture(autouse=True)
def off_vllm_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same expectations on any machine: the vLLM-CPU rules are switched on where a test asks."""
    monkeypatch.setattr("service.members.checks.vllm_cpu", lambda: False)


def lora_dir(root: Path, rank: int) -> Path:
    d = root / f"lora-r{rank}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    return d


def soft_dir(root: Path, hidden: int) -> Path:
    d = root / f"soft-{hidden}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    save_file({"prompt_embeddings": torch.zeros(4, hidden)}, str(d / "adapter_model.safetensors"))
    return d


def base_dir(root: Path, hidden: int = 128) -> Path:
    d = root / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    return d


def config(
    member: str,
    server_args: str = "[--enable-lora, --max-lora-rank, '8', --enable-prompt-embeds]",
    env: str = "{VLLM_ALLOW_RUNTIME_LORA_UPDATING: 'True'}",
    model: str = "/nowhere",
) -> str:
    return f"""
servers:
  - {{name: s, model: "{model}", args: {server_args}, env: {env}}}
members:
  - {{name: base, server: s, model: m}}
  - {member}
ensembles:
  e: {{members: [base, v]}}
"""


def test_missing_adapter_names_the_member(tmp_path: Path) -> None:
    cfg = parse_config(config(f'{{name: v, kind: lora, server: s, adapter: "{tmp_path}/gone"}}'))
    with pytest.raises(ConfigError, match=r"members\.v\.adapter: no adapter at"):
        check_members(cfg)


def test_unreadable_adapter_config(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text("{not json")
    cfg = parse_config(config(f'{{name: v, kind: lora, server: s, adapter: "{d}"}}'))
    with pytest.raises(ConfigError, match=r"members\.v\.adapter: cannot read"):
        check_members(cfg)


def test_rank_above_server_maximum(tmp_path: Path) -> None:
    cfg = parse_config(config(f'{{name: v, kind: lora, server: s, adapter: "{lora_dir(tmp_path, 16)}"}}'))
    with pytest.raises(ConfigError, match=r"members\.v: adapter rank 16 exceeds server 's'.s --max-lora-rank 8"):
        check_members(cfg)


def test_lora_on_a_server_without_lora(tmp_path: Path) -> None:
    cfg = parse_config(
        config(f'{{name: v, kind: lora, server: s, adapter: "{lora_dir(tmp_path, 4)}"}}', server_args="[]")
    )
    with pytest.raises(ConfigError, match=r"members\.v: server 's' is not started with --enable-lora"):
        check_members(cfg)


def test_runtime_lora_needs_runtime_updating(tmp_path: Path) -> None:
    cfg = parse_config(config(f'{{name: v, kind: lora, server: s, adapter: "{lora_dir(tmp_path, 4)}"}}', env="{}"))
    with pytest.raises(ConfigError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        check_members(cfg)


def test_startup_lora_goes_into_server_args(tmp_path: Path) -> None:
    d = lora_dir(tmp_path, 4)
    cfg = parse_config(config(f'{{name: v, kind: lora, server: s, adapter: "{d}", load: startup}}', env="{}"))
    check_members(cfg)
    assert startup_server_args(cfg) == {"s": ["--lora-modules", f"v={d}"]}


def test_soft_prompt_hidden_size_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = base_dir(tmp_path, hidden=128)
    text = config(
        f'{{name: v, kind: soft_prompt, server: s, model: m, adapter: "{soft_dir(tmp_path, 64)}"}}',
        model=str(base),
    )
    with pytest.raises(ConfigError, match=r"members\.v: soft prompt hidden size 64 differs from base .* 128"):
        check_members(parse_config(text))
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    assert "members.v: soft prompt hidden size 64" in capsys.readouterr().err


def test_soft_prompt_needs_prompt_embeds_on_its_server(tmp_path: Path) -> None:
    base = base_dir(tmp_path)
    text = config(
        f'{{name: v, kind: soft_prompt, server: s, model: m, adapter: "{soft_dir(tmp_path, 128)}"}}',
        server_args="[]",
        model=str(base),
    )
    with pytest.raises(ConfigError, match="not started with --enable-prompt-embeds"):
        check_members(parse_config(text))


def test_wrong_peft_type(tmp_path: Path) -> None:
    d = soft_dir(tmp_path, 128)
    cfg = parse_config(config(f'{{name: v, kind: lora, server: s, adapter: "{d}"}}'))
    with pytest.raises(ConfigError, match="not LORA"):
        check_members(cfg)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("{name: v, kind: lora, server: s}", "one of `adapter` or `soup`"),
        ("{name: v, kind: soft_prompt, server: s, adapter: x}", r"members.1 \(v\).model: Field required"),
        (
            '{name: v, kind: soft_prompt, endpoint: "http://h/v1", model: m, adapter: x}',
            "needs `base_checkpoint`",
        ),
        ('{name: v, kind: lora, endpoint: "http://h/v1", adapter: x, load: startup}', "needs a `server`"),
        # A field its kind does not take is refused by the kind's model, by name.
        ("{name: v, server: s, model: m, adapter: x}", r"members.1 \(v\).adapter: Extra inputs"),
        ("{name: v, kind: soft_prompt, server: s, model: m, adapter: x, load: startup}", r"\(v\).load: Extra"),
        ("{name: v, kind: bottleneck, server: s, adapter: x, soup: {adapters: []}}", r"\(v\).soup: Extra"),
    ],
)
def test_kind_fields_are_validated(member: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(config(member))


def test_aggregation_prompt_lists_candidates_in_rank_order() -> None:
    msgs = aggregation_messages("Rank order:\n{candidates}\n{instruction_block}", "Be brief.", "Q?", ["best", "next"])
    assert msgs[0] == {
        "role": "system",
        "content": "Rank order:\n[1] best\n\n[2] next\nInstruction: Be brief.\n\n",
    }
    assert msgs[1] == {"role": "user", "content": "Be brief.\n\nQ?"}
    assert aggregation_messages("{candidates}", "", "Q?", ["a"])[1]["content"] == "Q?"


def test_llm_fuser_template_fields_are_checked() -> None:
    base = 'members: [{name: a, endpoint: "http://h/v1", model: m}]\nensembles: {e: {members: [a], fuser: f}}\n'
    with pytest.raises(ConfigError, match=r"must contain \{candidates\}"):
        parse_config(base + 'fusers: {f: {kind: llm, endpoint: "http://h/v1", model: m, template: "hi"}}')
    cfg = parse_config(base + 'fusers: {f: {kind: llm, endpoint: "http://h/v1", model: m}}')
    assert cfg.fusers["f"].kind == "llm"


def test_two_members_on_one_startup_adapter_load_it_once(tmp_path: Path) -> None:
    d = lora_dir(tmp_path, 4)
    twin = f'{{name: v2, kind: lora, server: s, model: v, adapter: "{d}", load: startup, samples: 2}}'
    text = config(f'{{name: v, kind: lora, server: s, adapter: "{d}", load: startup}}', env="{}")
    cfg = parse_config(text.replace("ensembles:", f"  - {twin}\nensembles:"))
    assert startup_server_args(cfg) == {"s": ["--lora-modules", f"v={d}"]}


TWO_LORAS = """
servers:
  - {{name: s, model: /m, args: [--enable-lora{extra}]}}
  - {{name: t, model: /n, args: []}}
members:
  - {{name: base, server: s, model: m}}
  - {{name: x, kind: lora, server: s, adapter: /a, load: startup}}
  - {{name: x-samples, kind: lora, server: s, model: x, adapter: /a, load: startup, samples: 2}}
  - {{name: y, kind: lora, server: s, adapter: /b, load: startup}}
  - {{name: other, server: t, model: n}}
ensembles:
  e: {{members: [base, x, x-samples, y, other]}}
"""


@pytest.fixture
def on_vllm_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.members.checks.vllm_cpu", lambda: True)


def test_vllm_cpu_servers_get_a_lora_slot_more_than_their_adapters(on_vllm_cpu: None) -> None:
    """Two adapters (x and its sampled twin share one) need three slots; a server without LoRA gets none."""
    extra = startup_server_args(parse_config(TWO_LORAS.format(extra="")))
    assert extra["s"][-2:] == ["--max-loras", "3"]
    assert "t" not in extra
    # Given by the config, it is the config's: enough is left alone.
    extra = startup_server_args(parse_config(TWO_LORAS.format(extra=", --max-loras, '8'")))
    assert "--max-loras" not in extra["s"]


def test_too_few_lora_slots_on_vllm_cpu_are_refused(on_vllm_cpu: None) -> None:
    cfg = parse_config(TWO_LORAS.format(extra=", --max-loras, '2'"))
    with pytest.raises(ConfigError, match=r"servers\.0 \(s\)\.args: --max-loras 2 is too few for its 2 LoRA") as e:
        check_lora_slots(cfg)
    assert "--max-loras 3 or more" in str(e.value)
    check_lora_slots(parse_config(TWO_LORAS.format(extra=", --max-loras=3")))  # the = form, enough: accepted


def test_lora_slots_are_left_to_the_config_off_vllm_cpu() -> None:
    """The GPU kernels skip a token's -1 index; there vLLM's own default stands."""
    cfg = parse_config(TWO_LORAS.format(extra=", --max-loras, '1'"))
    check_lora_slots(cfg)
    assert "--max-loras" not in startup_server_args(cfg)["s"]
