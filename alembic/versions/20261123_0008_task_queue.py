"""task_queue: the queue and its leases move out of tasks, so that ending a task is a HOT
update and the claim writes two entries into narrow indexes instead of five into wide ones

Every claim and every completion updated a tasks row in an indexed column (status, in the
predicates of the partial indexes), so neither could be a HOT update: each wrote a new
entry into every index of the table (the primary key, the 48-byte unique URL-hash index,
(job_id, status) and the partial queue and lease indexes), eight per task. perf of a
backend on the no-op queue benchmark: 41% of its CPU in B-tree inserts.

Now a task to be done has a row in task_queue (task id, job, host, priority, due time,
attempts, lease). The claim updates only that row (two index entries: the primary key
and the leased rows' index); the end of a task
deletes it and updates the tasks row in unindexed columns only (HOT: no index entry; the
tasks table gets a fillfactor for it); a lease renewal and the mark of a fetched task are
HOT updates of the queue row. tasks.status is queued while a task is waiting or leased
(the lease is the queue row's); 'leased' is no longer written. A statement-level trigger
adds a queue row for every task inserted queued, whoever inserts it.

Measured beside the old layout (/tmp prototype, one connection, claim 200 + complete):
backend CPU per task 35-47 us before, 21-29 us after.

Not additive: workers of revision 0007 read the columns this drops. Stop them, migrate,
start the new version (a worker checks the schema revision as it starts).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 12:00:00
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASKS_FILLFACTOR = 80  # app.database.models.TASKS_FILLFACTOR when this revision was written


def _claim_function_0007() -> str:
    """Revision 0007's trawler_claim(), restored by the downgrade."""
    path = Path(__file__).with_name("20261123_0007_settle_function.py")
    spec = importlib.util.spec_from_file_location("trawler_migration_0007", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load revision 0007 from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module._claim_function())


QUEUE_TRIGGER_FUNCTION = r"""
CREATE OR REPLACE FUNCTION trawler_queue_new_tasks() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO task_queue (task_id, job_id, host, priority, next_attempt_at, attempts)
    SELECT a.id, a.job_id, a.host, a.priority, a.next_attempt_at, a.attempts
    FROM added a WHERE a.status = 'queued';
    RETURN NULL;
END
$fn$
"""
QUEUE_TRIGGER = r"""
CREATE TRIGGER tasks_queue_new_tasks AFTER INSERT ON tasks
REFERENCING NEW TABLE AS added
FOR EACH STATEMENT EXECUTE FUNCTION trawler_queue_new_tasks()
"""

# The claim of revisions 0006/0007 (see their notes), on task_queue. The same steps:
# 0. the caller's leased tasks whose requests are over stop counting against their hosts;
# 1. lock the hosts to serve (skip scan over ix_task_queue_claim, FOR UPDATE SKIP LOCKED);
# 2. in a fresh snapshot, lease each host's best due tasks within its room.
CLAIM_FUNCTION = r"""
CREATE OR REPLACE FUNCTION trawler_claim(
    p_after text, p_n int, p_max_hosts int, p_worker uuid, p_lease float8, p_done bigint[],
    p_live_s float8
) RETURNS TABLE (
    id bigint, job_id uuid, url text, depth int, attempts int, max_attempts int, host text,
    delay_ms int, cursor_host text, hosts_locked int
)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_after text := p_after;
    v_stop text := NULL;
    v_k int := least(p_n, p_max_hosts);
    v_hosts text[] := '{}';
    v_caps int[] := '{}';
    v_delays int[] := '{}';
    v_cursor text := '';
    r record;
BEGIN
    -- 0. the caller's leased tasks whose requests are over stop counting against their
    --    hosts, in every worker's claim (a HOT update: fetched_at is in no index). Those
    --    the caller's writer is storing right now are skipped, not waited for
    UPDATE task_queue q SET fetched_at = now()
    FROM (SELECT d.task_id FROM task_queue d
          WHERE d.task_id = ANY(p_done) AND d.lease_owner = p_worker AND d.fetched_at IS NULL
          FOR NO KEY UPDATE OF d SKIP LOCKED) d
    WHERE q.task_id = d.task_id;
    -- 1. lock the hosts to serve: after the cursor, then (wrapping around) from the
    --    start up to it; every statement of a function sees a fresh snapshot
    FOR pass IN 1..2 LOOP
        EXIT WHEN v_k <= 0 OR (pass = 2 AND p_after = '');
        IF pass = 2 THEN
            v_after := '';
            v_stop := p_after;
        END IF;
        FOR r IN
            WITH RECURSIVE hs(host) AS (
                (SELECT host FROM task_queue
                 WHERE lease_owner IS NULL AND host > v_after ORDER BY host LIMIT 1)
                UNION ALL
                SELECT (SELECT q.host FROM task_queue q
                        WHERE q.lease_owner IS NULL AND q.host > hs.host ORDER BY q.host LIMIT 1)
                FROM hs
                WHERE hs.host IS NOT NULL AND (CAST(v_stop AS text) IS NULL OR hs.host < v_stop)
            )
            SELECT h.host, h.max_concurrency, greatest(h.delay_ms, h.robots_delay_ms) AS delay_ms
            FROM hs JOIN hosts h ON h.host = hs.host
            WHERE (CAST(v_stop AS text) IS NULL OR hs.host <= v_stop)
              AND h.blocked_until <= now() AND h.next_fetch_at <= now()
              AND NOT (SELECT paused FROM cluster_state WHERE id = 1)
              -- a due task: one probe of ix_task_queue_claim per host, in the index's order
              -- (a scalar subquery with LIMIT is never made a join)
              AND (SELECT 1 FROM task_queue q
                   WHERE q.host = h.host AND q.lease_owner IS NULL AND q.next_attempt_at <= now()
                   ORDER BY q.priority DESC, q.next_attempt_at, q.task_id
                   LIMIT 1) IS NOT NULL
              AND (SELECT count(*) FROM task_queue q
                   WHERE q.host = h.host AND q.lease_owner IS NOT NULL AND q.fetched_at IS NULL)
                  < CASE WHEN greatest(h.delay_ms, h.robots_delay_ms) > 0 THEN 1 ELSE h.max_concurrency END
            LIMIT v_k
            FOR UPDATE OF h SKIP LOCKED
        LOOP
            v_hosts := v_hosts || r.host;
            v_caps := v_caps || r.max_concurrency;
            v_delays := v_delays || r.delay_ms;
            v_cursor := r.host;
            v_k := v_k - 1;
        END LOOP;
    END LOOP;
    IF cardinality(v_hosts) > 0 THEN
        -- 2. lease their tasks, in a snapshot taken after the locks were granted
        RETURN QUERY
        WITH h AS (
            SELECT * FROM unnest(CAST(v_hosts AS text[]), CAST(v_caps AS int[]),
                                 CAST(v_delays AS int[])) AS h(host, cap, delay_ms)
        ), live AS (
            -- running workers with a recent heartbeat: each may hold its share of a host's room
            SELECT greatest(count(*), 1) AS n FROM workers
            WHERE state = 'running' AND heartbeat_at > now() - make_interval(secs => p_live_s)
        ), room AS (
            SELECT h.host, CASE WHEN h.delay_ms > 0 THEN CAST(c.leased = 0 AS int)
                                ELSE greatest(least(h.cap - c.leased,
                                                    ceil(h.cap / CAST(live.n AS numeric)) - c.mine),
                                              0) END AS k
            FROM h CROSS JOIN live CROSS JOIN LATERAL (
                SELECT count(*) AS leased, count(*) FILTER (WHERE q.lease_owner = p_worker) AS mine
                FROM task_queue q
                WHERE q.host = h.host AND q.lease_owner IS NOT NULL AND q.fetched_at IS NULL
            ) c
        ), cand AS (
            -- each host's best due tasks, at most its room and its share of the batch (twice an
            -- even split, so that hosts with fewer due tasks leave room to the others)
            SELECT c.task_id, c.priority, c.next_attempt_at
            FROM room r CROSS JOIN LATERAL (
                SELECT q.task_id, q.priority, q.next_attempt_at FROM task_queue q
                WHERE q.host = r.host AND q.lease_owner IS NULL AND q.next_attempt_at <= now()
                ORDER BY q.priority DESC, q.next_attempt_at, q.task_id
                LIMIT least(r.k, ceil(2.0 * p_n / (SELECT count(*) FROM h)))
            ) c
            WHERE r.k > 0
        ), picked AS (
            -- only the rows taken are locked (no other claim can take them: their hosts are
            -- ours); a row that a cancellation holds right now is skipped. By primary key:
            -- as `IN (SELECT ...)` the planner hashed the candidates and read the whole
            -- queue sequentially (9 ms of a 500-task claim on a 90,000-task queue)
            SELECT q.task_id FROM task_queue q
            WHERE q.task_id = ANY(ARRAY(SELECT task_id FROM cand
                                        ORDER BY priority DESC, next_attempt_at, task_id
                                        LIMIT p_n))
              AND q.lease_owner IS NULL
            FOR NO KEY UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE task_queue q SET
                lease_owner = p_worker, leased_at = now(),
                lease_expires_at = now() + make_interval(secs => p_lease),
                attempts = q.attempts + 1, fetched_at = NULL
            FROM picked
            WHERE q.task_id = picked.task_id AND NOT (SELECT paused FROM cluster_state WHERE id = 1)
            RETURNING q.task_id, q.job_id, q.attempts, q.host
        ), per_job AS (
            SELECT job_id, count(*) AS n FROM claimed GROUP BY job_id
        ), locked AS MATERIALIZED (
            SELECT j.id FROM jobs j JOIN per_job p ON p.job_id = j.id ORDER BY j.id FOR NO KEY UPDATE OF j
        ), counted AS (
            UPDATE jobs j SET queued = j.queued - p.n, running = j.running + p.n, updated_at = now()
            FROM per_job p, locked l WHERE j.id = p.job_id AND l.id = j.id
        ), spaced AS (
            UPDATE hosts SET next_fetch_at = now() + make_interval(secs => h.delay_ms / 1000.0)
            FROM h WHERE hosts.host = h.host AND h.delay_ms > 0
              AND hosts.host IN (SELECT host FROM claimed)
        )
        -- the task's own columns by primary key (read only: the tasks row is not written)
        SELECT c.task_id, c.job_id, t.url, CAST(t.depth AS int), CAST(c.attempts AS int),
               CAST(t.max_attempts AS int), CAST(c.host AS text), h.delay_ms,
               CAST(NULL AS text), CAST(NULL AS int)
        FROM claimed c JOIN tasks t ON t.id = c.task_id JOIN h ON h.host = c.host;
    END IF;
    -- last row: where the next claim's walk starts, and how many hosts were locked
    RETURN QUERY SELECT CAST(NULL AS bigint), CAST(NULL AS uuid), CAST(NULL AS text),
        CAST(NULL AS int), CAST(NULL AS int), CAST(NULL AS int), CAST(NULL AS text),
        CAST(NULL AS int), v_cursor, cardinality(v_hosts);
END
$fn$
"""


def upgrade() -> None:
    op.create_table(
        "task_queue",
        sa.Column("task_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.UUID(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("leased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(lease_owner IS NULL) = (lease_expires_at IS NULL)",
            name=op.f("ck_task_queue_lease_has_expiry"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_task_queue_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_task_queue")),
    )
    # the tasks still to do, with their leases (a leased task's updated_at is its lease time)
    op.execute(
        """
        INSERT INTO task_queue (task_id, job_id, host, priority, next_attempt_at, attempts,
                                lease_owner, lease_expires_at, leased_at, fetched_at)
        SELECT id, job_id, host, priority, next_attempt_at, attempts, lease_owner,
               lease_expires_at, CASE WHEN lease_owner IS NOT NULL THEN updated_at END,
               fetched_at
        FROM tasks WHERE status IN ('queued', 'leased')
        """
    )
    op.execute("UPDATE tasks SET status = 'queued' WHERE status = 'leased'")
    op.create_index(
        "ix_task_queue_claim",
        "task_queue",
        ["host", sa.text("priority DESC"), "next_attempt_at", "task_id"],
        postgresql_where=sa.text("lease_owner IS NULL"),
    )
    op.create_index(
        "ix_task_queue_leased",
        "task_queue",
        ["host"],
        postgresql_where=sa.text("lease_owner IS NOT NULL"),
    )
    op.create_index(
        "ix_task_queue_job_id",
        "task_queue",
        ["job_id"],
        postgresql_where=sa.text("lease_owner IS NULL"),
    )
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.drop_index("ix_tasks_lease_expiry", table_name="tasks")
    op.drop_index("ix_tasks_host_leased", table_name="tasks")
    op.drop_index("ix_tasks_job_status", table_name="tasks")
    op.drop_constraint(op.f("ck_tasks_lease_iff_leased"), "tasks", type_="check")
    op.drop_column("tasks", "lease_owner")
    op.drop_column("tasks", "lease_expires_at")
    op.drop_column("tasks", "fetched_at")
    op.execute(f"ALTER TABLE tasks SET (fillfactor = {TASKS_FILLFACTOR})")
    op.execute(QUEUE_TRIGGER_FUNCTION)
    op.execute(QUEUE_TRIGGER)
    op.execute(CLAIM_FUNCTION)


def downgrade() -> None:
    op.execute(_claim_function_0007())
    op.execute("DROP TRIGGER IF EXISTS tasks_queue_new_tasks ON tasks")
    op.execute("DROP FUNCTION IF EXISTS trawler_queue_new_tasks()")
    op.execute("ALTER TABLE tasks RESET (fillfactor)")
    op.add_column("tasks", sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("tasks", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("tasks", sa.Column("lease_owner", postgresql.UUID(), nullable=True))
    op.execute(
        """
        UPDATE tasks t SET attempts = q.attempts, next_attempt_at = q.next_attempt_at,
            status = CASE WHEN q.lease_owner IS NOT NULL THEN 'leased' ELSE t.status END,
            lease_owner = q.lease_owner, lease_expires_at = q.lease_expires_at,
            fetched_at = q.fetched_at
        FROM task_queue q WHERE q.task_id = t.id
        """
    )
    op.create_check_constraint(
        op.f("ck_tasks_lease_iff_leased"),
        "tasks",
        "(status = 'leased') = (lease_expires_at IS NOT NULL)",
    )
    op.create_index("ix_tasks_job_status", "tasks", ["job_id", "status"])
    op.create_index(
        "ix_tasks_host_leased", "tasks", ["host"], postgresql_where=sa.text("status = 'leased'")
    )
    op.create_index(
        "ix_tasks_lease_expiry",
        "tasks",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'leased'"),
    )
    op.create_index(
        "ix_tasks_claim",
        "tasks",
        ["host", sa.text("priority DESC"), "next_attempt_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.drop_table("task_queue")
