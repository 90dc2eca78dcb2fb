"""Router checkpoints and predictions (numpy only: the encoder is exercised in the integration tier)."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.config import RouterConfig
from service.errors import ConfigError
from service.models.routers.encoder import RouterModel
from service.models.routers.random import RandomRouter


def unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, dtype=np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def test_knn_averages_the_neighbours_where_a_member_answered(tmp_path: Path) -> None:
    keys = unit([[1, 0], [1, 0.1], [0, 1], [0.1, 1]])
    labels = np.array([[1, 0], [1, np.nan], [0, 1], [np.nan, 1]], dtype=np.float32)
    model = RouterModel("knn", ["x", "y"], "enc", {"embeddings": keys, "labels": labels}, k=2)
    p = model.predict(unit([[1, 0.05], [0.05, 1]]))
    assert p[0, 0] == pytest.approx(1.0) and p[0, 1] == pytest.approx(0.0)  # y unknown at one neighbour
    assert p[1, 0] == pytest.approx(0.0) and p[1, 1] == pytest.approx(1.0)
    model.save(tmp_path / "r")
    again = RouterModel.load(tmp_path / "r")
    assert again.kind == "knn" and again.members == ["x", "y"] and again.k == 2
    np.testing.assert_array_equal(again.predict(unit([[1, 0.05]])), p[:1])


def test_knn_falls_back_to_the_members_prior_where_no_neighbour_knows() -> None:
    keys = unit([[1, 0], [0, 1]])
    labels = np.array([[1, np.nan], [0, 0.0]], dtype=np.float32)
    model = RouterModel("knn", ["x", "y"], "enc", {"embeddings": keys, "labels": labels}, k=1)
    assert model.predict(unit([[1, 0]]))[0, 1] == pytest.approx(0.0)  # y's mean over its known labels


def test_linear_is_a_logistic_unit_per_member(tmp_path: Path) -> None:
    model = RouterModel("linear", ["x", "y"], "enc", {"weight": np.array([[2.0, -2.0], [0, 0]]), "bias": np.zeros(2)})
    p = model.predict(np.array([[1.0, 0.0]]))
    assert p[0, 0] == pytest.approx(1 / (1 + np.exp(-2))) and p[0, 1] == pytest.approx(1 / (1 + np.exp(2)))


def test_a_checkpoint_that_is_not_a_router_is_refused(tmp_path: Path) -> None:
    (tmp_path / "router.json").write_text('{"format": "something/9"}')
    np.savez(tmp_path / "router.npz", a=np.zeros(1))
    with pytest.raises(ConfigError, match="format"):
        RouterModel.load(tmp_path)
    with pytest.raises(ConfigError, match="router checkpoint"):
        RouterModel.load(tmp_path / "missing")


def test_random_router_is_seeded_by_the_source() -> None:
    router = RandomRouter("rand", RouterConfig(kind="random"), ["a", "b", "c"])
    one = asyncio.run(router.scores("q1"))
    assert one == asyncio.run(router.scores("q1"))
    orders = {tuple(sorted(s, key=s.__getitem__)) for s in (asyncio.run(router.scores(f"q{i}")) for i in range(30))}
    assert len(orders) > 3  # different sources, different orders
    other = RandomRouter("rand", RouterConfig(kind="random", seed=1), ["a", "b", "c"])
    assert asyncio.run(other.scores("q1")) != one


def test_an_encoder_router_needs_a_checkpoint() -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        RouterConfig(kind="encoder")
