"""What every config model shares: strict (unknown keys are errors), frozen, and names that are
safe in URLs, metrics and logs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Device = Annotated[
    str,
    Field(
        pattern=r"^(cpu|cuda|cuda:[0-9]+|mps)$",
        description="Where the model runs: cpu, cuda, cuda:N or mps.",
    ),
]
DType = Literal["float32", "float16", "bfloat16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def package_version() -> str:
    """The installed ensemble-gateway's version (0.0.0 when run from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ensemble-gateway")
    except PackageNotFoundError:
        return "0.0.0"
