"""A model that would run in the gateway's process, where torch or transformers is not installed
(the gateway image without the models extra), is refused naming its field, before anything loads."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from service.config import parse_config
from service.errors import ConfigError
from service.models.build import materialize as mat

REMOTE = """
members:
  - {name: a, endpoint: "http://127.0.0.1:9/v1", model: m}
rankers: {pairrm: {endpoint: "http://127.0.0.1:9"}}
fusers: {genfuser: {endpoint: "http://127.0.0.1:9"}, judge: {kind: llm, endpoint: "http://127.0.0.1:9/v1", model: m}}
routers: {coin: {kind: random}}
ensembles: {main: {members: [a], ranker: pairrm, fuser: genfuser, router: coin}}
"""


def without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in names else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_remote_models_need_no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    without(monkeypatch, "torch", "transformers")
    config = parse_config(REMOTE)
    assert mat.local_models(config) == []
    mat.check_model_runtime(config)  # nothing runs here: accepted


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            ('rankers: {pairrm: {endpoint: "http://127.0.0.1:9"}}', "rankers: {pairrm: {checkpoint: x}}"),
            "rankers.pairrm",
        ),
        (('genfuser: {endpoint: "http://127.0.0.1:9"}', "genfuser: {checkpoint: x}"), "fusers.genfuser"),
        (("coin: {kind: random}", "coin: {kind: encoder, checkpoint: x}"), "routers.coin"),
    ],
)
def test_a_model_in_process_without_torch_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, edit: tuple[str, str], field: str
) -> None:
    config = parse_config(REMOTE.replace(*edit))
    assert mat.local_models(config) == [field]
    mat.check_model_runtime(config)  # torch is installed here
    without(monkeypatch, "torch")
    with pytest.raises(ConfigError) as e:
        mat.check_model_runtime(config)
    assert str(e.value).startswith(f"{field}: runs in this process, which lacks torch")
    assert "ensemble-gateway[models]" in str(e.value)
