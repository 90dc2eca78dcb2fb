"""Building parts from a configuration: targets, prompt-embeds gates, and what a rebuild keeps."""

from __future__ import annotations

import httpx
import pytest

from service.errors import ConfigError
from service.members.soft_prompt import BaseModelCache
from service.pipeline.pipeline import Lasting
from service.serving.build import Components, build_pipeline, prompt_embeds_gates, target_url
from service.telemetry.metrics import Metrics
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config


def test_target_url_names_a_server_that_is_not_running() -> None:
    assert target_url("members.a", "http://h:1/v1", None, {}) == "http://h:1/v1"
    assert target_url("members.a", None, "llama", {"llama": "http://127.0.0.1:5/v1"}) == "http://127.0.0.1:5/v1"
    with pytest.raises(ConfigError, match=r"members\.a\.server: server 'llama' is not running"):
        target_url("members.a", None, "llama", {})


def test_gate_only_where_soft_prompts_share_a_server_with_token_requests() -> None:
    mixed = FAKE_CONFIG.replace(
        '  - {name: c, endpoint: "http://127.0.0.1:9/v1", model: m-c}',
        '  - {name: c, kind: soft_prompt, endpoint: "http://127.0.0.1:9/v1", model: m, adapter: x, base_checkpoint: y}',
    )
    assert set(prompt_embeds_gates(fake_config(mixed), {})) == {"http://127.0.0.1:9/v1"}
    assert prompt_embeds_gates(fake_config(), {}) == {}
    off = fake_config(mixed + "isolate_prompt_embeds: false\n")
    assert prompt_embeds_gates(off, {}) == {}


async def test_a_rebuild_takes_over_unchanged_parts_and_rebuilds_changed_ones() -> None:
    lasting = Lasting.new(fake_config(), Metrics())
    parts = Components(rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()})
    async with httpx.AsyncClient() as client:
        first = await build_pipeline(fake_config(), lasting, client, {}, parts, BaseModelCache())
        assert sorted(m.name for m in first.new_members) == ["a", "b", "c"]
        changed = fake_config(FAKE_CONFIG.replace("model: m-b}", "model: m-b2}"))
        second = await build_pipeline(changed, lasting, client, {}, parts, BaseModelCache(), previous=first.pipeline)
    assert [m.name for m in second.new_members] == ["b"]
    assert second.pipeline.members["a"] is first.pipeline.members["a"]
    assert second.pipeline.members["b"] is not first.pipeline.members["b"]


async def test_prebuilt_members_are_used_as_given() -> None:
    a, b, c = FakeMember("a", "x"), FakeMember("b", "y"), FakeMember("c", "z")
    parts = Components(
        members={"a": a, "b": b, "c": c}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )
    async with httpx.AsyncClient() as client:
        built = await build_pipeline(
            fake_config(), Lasting.new(fake_config(), Metrics()), client, {}, parts, BaseModelCache()
        )
    assert built.pipeline.members == {"a": a, "b": b, "c": c} and built.new_members == []
