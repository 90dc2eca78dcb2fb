"""The store of answers and feedback (``store:``): where it is, how long it keeps records, and
whether it keeps the inputs' texts."""

from __future__ import annotations

from pydantic import Field, field_validator

from service.config.base import Strict

# SQLAlchemy URL schemes the store takes, and the async driver each one runs on.
STORE_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class StoreConfig(Strict):
    """Every answer's evidence (input, candidates, scores, choice, fusion) and the feedback on it,
    written off the request path: a slow or absent database drops records (counted), never answers."""

    url: str | None = Field(
        None,
        description="A SQLAlchemy URL: `sqlite:///path/store.db` (embedded, one gateway) or "
        "`postgresql://user:password@host/db` (several gateways share it). Default: an SQLite file "
        "`store.db` in the cache directory (`cache_dir`). `${VAR}` reads a password from the environment.",
    )
    retention_days: float | None = Field(
        30.0, gt=0, description="Records (and their feedback) older than this are deleted; none: kept forever."
    )
    record_inputs: bool = Field(
        True,
        description="Keep the prompt, messages and instruction as text; false keeps their SHA-256 instead "
        "(such records cannot train a ranker or continue a stored response).",
    )
    queue_size: int = Field(
        10_000, ge=1, description="Records waiting to be written at most; beyond it they are dropped (counted)."
    )
    batch_size: int = Field(200, ge=1, le=10_000, description="Records written in one transaction at most.")
    write_timeout_s: float = Field(5.0, gt=0, description="A batch not written by then is dropped (counted).")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = v.partition("://")[0]
        if scheme not in STORE_DRIVERS:
            raise ValueError(f"store URL scheme {scheme!r}: use one of sqlite://, postgresql://")
        return v
