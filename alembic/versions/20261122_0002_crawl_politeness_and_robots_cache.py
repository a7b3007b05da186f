"""crawl politeness and robots cache

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 19:30:25.222269
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("max_concurrency", sa.SmallInteger(), server_default="8", nullable=False),
        sa.Column("delay_ms", sa.Integer(), server_default="0", nullable=False),
        sa.Column("leased", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_grant", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_fetch_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "blocked_until",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("robots", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("robots_delay_ms", sa.Integer(), server_default="0", nullable=False),
        sa.Column("robots_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("leased >= 0", name=op.f("ck_hosts_leased_nonneg")),
        sa.CheckConstraint("max_concurrency >= 1", name=op.f("ck_hosts_concurrency_positive")),
        sa.PrimaryKeyConstraint("host", name=op.f("pk_hosts")),
    )
    op.add_column("jobs", sa.Column("skipped", sa.Integer(), server_default="0", nullable=False))
    op.drop_constraint(op.f("ck_jobs_counters_nonneg"), "jobs", type_="check")
    op.create_check_constraint(
        "counters_nonneg",
        "jobs",
        "total >= 0 AND queued >= 0 AND running >= 0 AND succeeded >= 0 AND failed >= 0"
        " AND skipped >= 0",
    )
    # existing hosts get a row, so the claim can count their leases
    op.execute(
        "INSERT INTO hosts (host, leased) SELECT host, count(*) FILTER (WHERE status = 'leased') "
        "FROM tasks GROUP BY host ON CONFLICT DO NOTHING"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_jobs_counters_nonneg"), "jobs", type_="check")
    op.create_check_constraint(
        "counters_nonneg",
        "jobs",
        "total >= 0 AND queued >= 0 AND running >= 0 AND succeeded >= 0 AND failed >= 0",
    )
    op.drop_column("jobs", "skipped")
    op.drop_table("hosts")
