"""Alembic's environment for the store: migrations run on the connection the store hands over
(``service.store.migrate``), never from a URL of their own."""

from __future__ import annotations

from alembic import context

from service.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the store's migrations run through service.store.migrate (with a connection)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
