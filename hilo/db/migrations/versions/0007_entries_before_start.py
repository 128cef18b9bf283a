"""entries recorded before their workflow starts: keyed by workflow id and entry number,
one entry per triggering event, the run id filled in once known

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# An event delivered again after its entry ended could enter again: the later entry keeps
# the trigger, so that one event names one entry.
FORGET_REPEATED_TRIGGERS = """
UPDATE journey_instances SET trigger_message_id = NULL
WHERE EXISTS (
    SELECT 1 FROM journey_instances AS later
    WHERE later.workflow_id = journey_instances.workflow_id
      AND later.trigger_message_id = journey_instances.trigger_message_id
      AND later.entry > journey_instances.entry
)
"""


def _instances(*key: str) -> sa.Table:
    """The table as SQLite copies it (it alters a primary key no other way), already keyed
    by ``key``; PostgreSQL alters it in place and needs no copy."""
    return sa.Table(
        "journey_instances",
        sa.MetaData(),
        sa.Column("run_id", sa.String(length=64), nullable="run_id" not in key),
        sa.Column("workflow_id", sa.String(length=1000), nullable=False),
        sa.Column("entry", sa.Integer(), nullable=False),
        sa.Column("journey_key", sa.String(length=63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=False),
        sa.Column("instance_key", sa.String(length=200), nullable=True),
        sa.Column("trigger_message_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("holdout", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("exit_reason", sa.String(length=200), nullable=True),
        sa.Column("converted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revenue", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint(*key, name="journey_instances_pkey"),
        sa.Index("ix_journey_instances_customer_id", "customer_id"),
        sa.Index("ix_journey_instances_journey_key", "journey_key"),
        sa.Index("ix_journey_instances_status", "status"),
        sa.Index("ix_journey_instances_trigger_message_id", "trigger_message_id"),
    )


def upgrade() -> None:
    op.execute(FORGET_REPEATED_TRIGGERS)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("journey_instances_pkey", "journey_instances", type_="primary")
    copy = _instances("workflow_id", "entry")
    sa.Index("ix_journey_instances_workflow_id", copy.c.workflow_id)
    with op.batch_alter_table("journey_instances", copy_from=copy) as batch_op:
        batch_op.drop_index("ix_journey_instances_workflow_id")
        batch_op.create_primary_key("journey_instances_pkey", ["workflow_id", "entry"])
        batch_op.alter_column("run_id", existing_type=sa.String(length=64), nullable=True)
        batch_op.create_index("ix_journey_instances_run_id", ["run_id"], unique=True)
        batch_op.create_unique_constraint(
            "uq_journey_instances_trigger", ["workflow_id", "trigger_message_id"]
        )


def downgrade() -> None:
    op.execute("DELETE FROM journey_instances WHERE run_id IS NULL")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("journey_instances_pkey", "journey_instances", type_="primary")
    copy = _instances("run_id")
    copy.append_constraint(
        sa.UniqueConstraint(
            "workflow_id", "trigger_message_id", name="uq_journey_instances_trigger"
        )
    )
    sa.Index("ix_journey_instances_run_id", copy.c.run_id, unique=True)
    with op.batch_alter_table("journey_instances", copy_from=copy) as batch_op:
        batch_op.drop_constraint("uq_journey_instances_trigger", type_="unique")
        batch_op.drop_index("ix_journey_instances_run_id")
        batch_op.alter_column("run_id", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_primary_key("journey_instances_pkey", ["run_id"])
        batch_op.create_index("ix_journey_instances_workflow_id", ["workflow_id"], unique=False)
