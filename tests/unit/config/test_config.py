import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from service.config import FuserConfig, GatewayConfig, RankerConfig, expand_env, load_config, parse_config
from service.errors import ConfigError
from tests.fakes import FAKE_CONFIG

ROOT = Path(__file__).resolve().parents[3]


def test_demo_config_is_valid() -> None:
    cfg = load_config(ROOT / "config" / "demo.yaml")
    assert cfg.default == "demo"
    demo = cfg.ensembles["demo"]
    assert len(demo.members) >= 3
    bases = {cfg.member(m).server for m in demo.members}
    assert len(bases) >= 2, "the demo needs members built from at least two base checkpoints"
    assert all(isinstance(r, RankerConfig) and r.device == "cpu" and r.dtype == "float32" for r in cfg.rankers.values())
    assert all(f.device == "cpu" and f.dtype == "float32" for f in cfg.fusers.values() if f.kind == "genfuser")
    kinds = {cfg.member(m).kind for m in demo.members}
    assert kinds == {"model", "lora", "soft_prompt"} and len(demo.members) >= 5
    variants = [cfg.member(m) for m in demo.members if cfg.member(m).kind != "model"]
    assert len({v.server for v in variants}) == 1, "adapter variants share one server"


def test_defaults_follow_llm_blender() -> None:
    cfg = parse_config(FAKE_CONFIG)
    r, f = cfg.rankers["length"], cfg.fusers["join"]
    assert isinstance(f, FuserConfig) and isinstance(r, RankerConfig)
    assert (r.source_max_length, r.candidate_max_length, r.aggregation) == (1224, 412, "max_logits")
    assert (f.max_length, f.candidate_max_length, f.num_beams, f.max_new_tokens) == (1024, 128, 4, None)
    assert cfg.ensembles["plain"].fuse_top_k == 1 and cfg.ensembles["main"].fuse_top_k == 2  # plain: the older name


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        (("members: [a, b, c]", "members: [a, b, zz]"), "ensembles.main.members"),
        (("ranker: length", "ranker: nope"), "ensembles.main.ranker"),
        (("fuser: join", "fuser: nope"), "ensembles.main.fuser"),
        (("model: m-b}", "model: m-b, server: s}"), "members.1 (b)"),
        (("temperature: 0.5", "temperature: 7"), "members.0 (a).sampling.temperature"),
        (("min_candidates: 2", "min_candidates: 9"), "ensembles.main"),
        (("deadline_s: 1", "deadline_s: -1"), "ensembles.main.deadline_s"),
        (("fuse_top_k: 2", "fuse_top_k: 2, colour: red"), "ensembles.main.colour"),
    ],
)
def test_bad_config_names_the_field(patch: tuple[str, str], field: str) -> None:
    text = FAKE_CONFIG.replace(*patch)
    assert text != FAKE_CONFIG
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert field in str(e.value)


def test_duplicate_member_names() -> None:
    text = FAKE_CONFIG.replace("name: c,", "name: b,")
    with pytest.raises(ConfigError, match="duplicate member names"):
        parse_config(text)


def test_env_expansion() -> None:
    env = {"A": "x", "EMPTY": ""}
    assert expand_env("${A}/${B:-dflt}/${EMPTY:-e}", env) == "x/dflt/e"
    with pytest.raises(ConfigError, match="B is not set"):
        expand_env("${B}", env)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("members: [")
    with pytest.raises(ConfigError, match="top level"):
        parse_config("- 1")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_env_is_expanded_in_values_not_in_comments_or_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_URL", "http://h:1/v1")
    monkeypatch.setenv("GW_EVIL", "x\nensembles: {}")
    cfg = parse_config(
        """
# ${UNSET_IN_A_COMMENT} must not be expanded
members:
  - {name: a, endpoint: "${GW_URL}", model: "${GW_EVIL}", timeout_s: "${GW_TIMEOUT:-7}"}
ensembles:
  e: {members: [a]}
"""
    )
    assert cfg.members[0].endpoint == "http://h:1/v1"
    assert cfg.members[0].model == "x\nensembles: {}" and cfg.members[0].timeout_s == 7.0
    assert list(cfg.ensembles) == ["e"]


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for f in model.model_fields.values():
        stack: list[object] = [f.annotation]
        while stack:
            t = stack.pop()
            stack.extend(typing.get_args(t))
            if isinstance(t, type) and issubclass(t, BaseModel):
                _models(t, seen)


def test_every_config_field_is_described() -> None:
    seen: set[type[BaseModel]] = set()
    _models(GatewayConfig, seen)
    missing = [f"{m.__name__}.{n}" for m in seen for n, f in m.model_fields.items() if not f.description]
    assert len(seen) > 10 and not missing, missing


@pytest.mark.parametrize(
    ("device", "ok"),
    [("cpu", True), ("cuda", True), ("cuda:1", True), ("mps", True), ("gpu", False), ("cuda:", False), ("CUDA", False)],
)
def test_device_is_checked_at_load(device: str, ok: bool) -> None:
    text = FAKE_CONFIG.replace("length: {checkpoint: unused}", f"length: {{checkpoint: unused, device: '{device}'}}")
    if ok:
        assert parse_config(text).local_ranker("length").device == device
    else:
        with pytest.raises(ConfigError, match=r"rankers\.length\.device"):
            parse_config(text)


def test_api_keys_are_read_once_per_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "one, two")
    config = parse_config(FAKE_CONFIG)
    monkeypatch.setenv("GATEWAY_API_KEYS", "three")
    assert config.auth.client_keys() == ["one", "two"]  # what the load saw
    assert parse_config(FAKE_CONFIG).auth.client_keys() == ["three"]  # a reload sees the new value


ADAPTER_SERVER = """
servers:
  - {name: ad, engine: adapters, model: /m, served_model_names: [base], python: /py, PLACE}
members:
  - {name: bn, kind: bottleneck, server: ad, adapter: /a}
ensembles:
  e: {members: [bn]}
"""


def test_adapter_server_device_and_dtype_reach_its_command_line() -> None:
    from service.ops.launcher import server_command

    cfg = parse_config(ADAPTER_SERVER.replace("PLACE", "device: 'cuda:1', dtype: bfloat16, args: [--max-batch, '4']"))
    cmd = server_command(cfg.servers[0], 8123)
    assert cmd[:3] == ["/py", "-m", "service.adapterserver"]
    assert cmd[cmd.index("--device") + 1] == "cuda:1" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[-2:] == ["--max-batch", "4"]
    # Unset, the server's own defaults (cpu, float32) apply: no flags at all.
    default = server_command(parse_config(ADAPTER_SERVER.replace("PLACE", "args: []")).servers[0], 8123)
    assert "--device" not in default and "--dtype" not in default


@pytest.mark.parametrize(
    ("place", "field"),
    [
        ("device: gpu", "servers.0 (ad).device"),
        ("dtype: float64", "servers.0 (ad).dtype"),
    ],
)
def test_adapter_server_device_and_dtype_are_checked(place: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(ADAPTER_SERVER.replace("PLACE", place))
    assert field in str(e.value)


def test_a_vllm_server_is_told_where_its_dtype_goes() -> None:
    text = ADAPTER_SERVER.replace("engine: adapters", "engine: vllm").replace("PLACE", "dtype: bfloat16")
    text = text.replace("kind: bottleneck, server: ad, adapter: /a", "server: ad, model: base")
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert "servers.0" in str(e.value) and "`dtype` is for `engine: adapters`" in str(e.value)
