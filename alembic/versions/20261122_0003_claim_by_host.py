"""claim by host: per-host queued and leased indexes for cluster-wide politeness

The claim walks the hosts that have queued work (a skip scan over ix_tasks_claim, now
led by host), locks each host's politeness row, counts its leased tasks
(ix_tasks_host_leased) and takes the best due tasks of each host up to its room.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.create_index(
        "ix_tasks_claim",
        "tasks",
        ["host", sa.text("priority DESC"), "next_attempt_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "ix_tasks_host_leased",
        "tasks",
        ["host"],
        postgresql_where=sa.text("status = 'leased'"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_host_leased", table_name="tasks")
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.create_index(
        "ix_tasks_claim",
        "tasks",
        [sa.text("priority DESC"), "next_attempt_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
