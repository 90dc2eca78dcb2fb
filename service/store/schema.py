"""The store's tables (SQLAlchemy Core, one schema for SQLite and PostgreSQL). Their history is
Alembic's (``migrations/``): a change here is a new revision there."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# One row per answered request. Nested evidence (candidates, failures, timings...) is JSON: it is
# written once and read whole, per answer or per export.
answers = sa.Table(
    "answers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the answer's hex id (APIs add their prefixes)
    sa.Column("created_at", sa.Float, nullable=False, index=True),  # Unix seconds
    sa.Column("api", sa.String(32), nullable=False),  # generate, chat, completions, responses
    sa.Column("ensemble", sa.String(128), nullable=False, index=True),
    sa.Column("config_digest", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=True),  # which client key (its digest), never the key
    sa.Column("metadata", sa.JSON(none_as_null=True), nullable=True),  # the client's own
    sa.Column("inputs_hashed", sa.Boolean, nullable=False),
    sa.Column("input", sa.JSON, nullable=False),  # prompt or messages, instruction, input_text
    sa.Column("output", sa.Text, nullable=False),
    sa.Column("fused", sa.Boolean, nullable=False),
    sa.Column("fusion", sa.JSON, nullable=False),  # policy, skipped (why), selected
    sa.Column("candidates", sa.JSON, nullable=False),
    sa.Column("failed", sa.JSON, nullable=False),
    sa.Column("degraded_reasons", sa.JSON, nullable=False),
    sa.Column("timings_ms", sa.JSON, nullable=False),
    sa.Column("usage", sa.JSON, nullable=False),
    sa.Column("finish_reason", sa.String(32), nullable=False),
    # What an API echoes back when its object is read again.
    sa.Column("request", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("retrievable", sa.Boolean, nullable=False),  # the Responses API's `store`
    sa.Column("not_called", sa.JSON(none_as_null=True), nullable=True),  # members routing left out (0002)
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("answer_id", sa.String(64), sa.ForeignKey("answers.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("key_id", sa.String(64), nullable=True),
    sa.Column("preferred", sa.String(256), nullable=True),
    sa.Column("rejected", sa.JSON, nullable=False),
    sa.Column("reference", sa.Text, nullable=True),
    sa.Column("rating", sa.Float, nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
)
