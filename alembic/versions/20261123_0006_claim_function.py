"""the claim as one function call: trawler_claim() locks the hosts to serve and leases their
tasks in one round trip; tasks.fetched_at

A claim held its hosts' row locks from the first statement to COMMIT, across three round
trips from a worker whose event loop is busy parsing pages; on a one-host crawl the other
workers' claims found the host locked (SKIP LOCKED) most of the time. In a function the
locks last as long as PostgreSQL's own work. Each statement in the function takes a new
snapshot (READ COMMITTED), so the lease count still sees the previous lock holder's leases.

The function also takes the per-worker share of a host's limit (running workers with a
recent heartbeat split it evenly), and marks the caller's leased tasks whose requests are
over (tasks.fetched_at, cleared when a task is leased): no claim counts marked tasks
against their host. Counting them only in the caller's own claims left a second worker on
a one-host crawl with empty claims (155 of 161 in bench/crawl).

Additive only: workers of revision 0005 keep claiming with their own statements (they
never set the new column).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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
    --    hosts, in every worker's claim
    UPDATE tasks SET fetched_at = now()
    WHERE id = ANY(p_done) AND status = 'leased' AND lease_owner = p_worker
      AND fetched_at IS NULL;
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
                (SELECT host FROM tasks WHERE status = 'queued' AND host > v_after ORDER BY host LIMIT 1)
                UNION ALL
                SELECT (SELECT t.host FROM tasks t
                        WHERE t.status = 'queued' AND t.host > hs.host ORDER BY t.host LIMIT 1)
                FROM hs
                WHERE hs.host IS NOT NULL AND (CAST(v_stop AS text) IS NULL OR hs.host < v_stop)
            )
            SELECT h.host, h.max_concurrency, greatest(h.delay_ms, h.robots_delay_ms) AS delay_ms
            FROM hs JOIN hosts h ON h.host = hs.host
            WHERE (CAST(v_stop AS text) IS NULL OR hs.host <= v_stop)
              AND h.blocked_until <= now() AND h.next_fetch_at <= now()
              AND NOT (SELECT paused FROM cluster_state WHERE id = 1)
              -- a due task: one probe of ix_tasks_claim per host (a scalar subquery with
              -- LIMIT is never made a join; as EXISTS the planner hashed all the host's
              -- queued tasks on every claim)
              AND (SELECT 1 FROM tasks t
                   WHERE t.host = h.host AND t.status = 'queued' AND t.next_attempt_at <= now()
                   LIMIT 1) IS NOT NULL
              AND (SELECT count(*) FROM tasks t WHERE t.host = h.host AND t.status = 'leased'
                     AND t.fetched_at IS NULL)
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
                SELECT count(*) AS leased, count(*) FILTER (WHERE t.lease_owner = p_worker) AS mine
                FROM tasks t
                WHERE t.host = h.host AND t.status = 'leased' AND t.fetched_at IS NULL
            ) c
        ), cand AS (
            -- each host's best due tasks, at most its room and its share of the batch (twice an
            -- even split, so that hosts with fewer due tasks leave room to the others)
            SELECT c.id, c.priority, c.next_attempt_at
            FROM room r CROSS JOIN LATERAL (
                SELECT t.id, t.priority, t.next_attempt_at FROM tasks t
                WHERE t.host = r.host AND t.status = 'queued' AND t.next_attempt_at <= now()
                ORDER BY t.priority DESC, t.next_attempt_at, t.id
                LIMIT least(r.k, ceil(2.0 * p_n / (SELECT count(*) FROM h)))
            ) c
            WHERE r.k > 0
        ), picked AS (
            -- only the rows taken are locked (no other claim can take them: their hosts are
            -- ours); a row that a cancellation holds right now is skipped
            SELECT t.id FROM tasks t
            WHERE t.id IN (SELECT id FROM cand ORDER BY priority DESC, next_attempt_at, id LIMIT p_n)
              AND t.status = 'queued'
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE tasks t SET
                status = 'leased', lease_owner = p_worker,
                lease_expires_at = now() + make_interval(secs => p_lease),
                attempts = t.attempts + 1, updated_at = now(), fetched_at = NULL
            FROM picked
            WHERE t.id = picked.id AND NOT (SELECT paused FROM cluster_state WHERE id = 1)
            RETURNING t.id, t.job_id, t.url, t.depth, t.attempts, t.max_attempts, t.host
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
        SELECT c.id, c.job_id, c.url, CAST(c.depth AS int), CAST(c.attempts AS int),
               CAST(c.max_attempts AS int), CAST(c.host AS text), h.delay_ms,
               CAST(NULL AS text), CAST(NULL AS int)
        FROM claimed c JOIN h ON h.host = c.host;
    END IF;
    -- last row: where the next claim's walk starts, and how many hosts were locked
    RETURN QUERY SELECT CAST(NULL AS bigint), CAST(NULL AS uuid), CAST(NULL AS text),
        CAST(NULL AS int), CAST(NULL AS int), CAST(NULL AS int), CAST(NULL AS text),
        CAST(NULL AS int), v_cursor, cardinality(v_hosts);
END
$fn$
"""


def upgrade() -> None:
    op.add_column("tasks", sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(CLAIM_FUNCTION)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS trawler_claim(text, int, int, uuid, float8, bigint[], float8)"
    )
    op.drop_column("tasks", "fetched_at")
