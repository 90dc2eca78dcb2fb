"""The store's schema brought to Alembic's head on a connection the store hands over: at start-up,
and again after an outage that began before it could run."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# Several gateway replicas may start together against one PostgreSQL: one migrates, the others wait.
ADVISORY_LOCK = 0x656E_7365  # "ense"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: sa.Connection) -> None:
    """Run every migration not yet applied (a sync connection: ``AsyncConnection.run_sync``)."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})
    command.upgrade(alembic_config(connection), "head")


def current(connection: sa.Connection) -> str | None:
    """The schema's revision, None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()
