"""journey notes: what an instance noticed for the timeline (an event that almost matched)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 08:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "journey_notes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workflow_id", sa.String(length=1000), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("journey_key", sa.String(length=63), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("step_id", sa.String(length=63), nullable=True),
        sa.Column("event_message_id", sa.String(length=200), nullable=False),
        sa.Column("summary", sa.String(length=500), nullable=False),
        sa.Column("noted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "event_message_id"),
    )
    with op.batch_alter_table("journey_notes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_journey_notes_customer_id"), ["customer_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("journey_notes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_journey_notes_customer_id"))
    op.drop_table("journey_notes")
