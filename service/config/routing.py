"""Routing: which members a request calls. A router (a trained checkpoint, or a seeded random
baseline) orders an ensemble's members by the chance that each one's answer is chosen; an ensemble's
``route``, ``cascade`` and ``max_member_calls`` decide how many of them are called."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from service.config.base import Device, DType, Strict
from service.config.models import ThreadBudget


class RouterConfig(Strict):
    """A router: ``encoder`` is a checkpoint made by ``ensemble-gateway train-router`` (a kNN over,
    or a logistic head on, a PairRM encoder's embedding of the source); ``random`` orders the members
    at random, seeded by the source (the baseline a trained router must beat)."""

    kind: Literal["encoder", "random"] = Field("encoder", description="encoder: a trained router; random: a baseline.")
    checkpoint: str | None = Field(None, description="kind encoder: the directory train-router wrote.")
    encoder: str | None = Field(
        None, description="kind encoder: the PairRM checkpoint that embeds sources; default: the one it was trained on."
    )
    device: Device = "cpu"
    dtype: DType = Field("float32", description="The encoder's weights and activations.")
    threads: ThreadBudget = None
    seed: int = Field(0, description="kind random: mixed into each source's seed.")

    @model_validator(mode="after")
    def _checkpoint(self) -> RouterConfig:
        if self.kind == "encoder" and not self.checkpoint:
            raise ValueError("checkpoint: an encoder router needs the directory train-router wrote")
        return self


class RouteConfig(Strict):
    """Call only the router's first ``members`` members."""

    members: int = Field(ge=1, description="Members called per request: the router's most likely first.")


class CascadeConfig(Strict):
    """Call the router's first ``members`` members; call the rest only when that answer is uncertain."""

    members: int = Field(2, ge=1, description="Members called first: the router's most likely first.")
    margin: float = Field(
        1.0,
        ge=0,
        description="The first answer is certain when the ranker's top candidate leads the best candidate that says "
        "something else by at least this much (candidates that all agree lead by infinity); else the rest are called.",
    )
    min_probability: float = Field(
        0.5,
        ge=0,
        le=1,
        description="With a single candidate in the first wave (nothing to compare): it is certain when the router "
        "gives its member at least this chance of being chosen.",
    )
