"""answers and feedback

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "answers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("api", sa.String(32), nullable=False),
        sa.Column("ensemble", sa.String(128), nullable=False),
        sa.Column("config_digest", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("inputs_hashed", sa.Boolean, nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("fused", sa.Boolean, nullable=False),
        sa.Column("fusion", sa.JSON, nullable=False),
        sa.Column("candidates", sa.JSON, nullable=False),
        sa.Column("failed", sa.JSON, nullable=False),
        sa.Column("degraded_reasons", sa.JSON, nullable=False),
        sa.Column("timings_ms", sa.JSON, nullable=False),
        sa.Column("usage", sa.JSON, nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=False),
        sa.Column("request", sa.JSON, nullable=True),
        sa.Column("retrievable", sa.Boolean, nullable=False),
    )
    op.create_index("ix_answers_created_at", "answers", ["created_at"])
    op.create_index("ix_answers_ensemble", "answers", ["ensemble"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("answer_id", sa.String(64), sa.ForeignKey("answers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("preferred", sa.String(256), nullable=True),
        sa.Column("rejected", sa.JSON, nullable=False),
        sa.Column("reference", sa.Text, nullable=True),
        sa.Column("rating", sa.Float, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
    )
    op.create_index("ix_feedback_answer_id", "feedback", ["answer_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("answers")
