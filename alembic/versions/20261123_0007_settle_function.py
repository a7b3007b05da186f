"""trawler_settle(): lock the jobs rows, then settle with a snapshot taken after the lock;
trawler_claim() no longer waits for the caller's own completions

1. The settle statement (job counters, crawl links as new tasks under follow.max_pages)
   locked the jobs rows inside the statement, so its snapshot was older than the lock:
   links another completion of the job inserted while this one waited looked new, took
   slots under the cap (numbered before ON CONFLICT dropped them as duplicates) and cut
   real links the cap still had room for. In a function the lock is its own statement and
   the settle statement that follows sees everything the previous holder committed.
2. The claim's first step marks the caller's fetched tasks (tasks.fetched_at). Those of
   them that the same worker's writer is storing right now are row-locked by the
   completion: the claim waited for that whole transaction (on a no-op queue, a third of
   the time). It now skips them (SKIP LOCKED): they stop counting against their host a
   moment later anyway, when the completion commits. Its probe for a host's due task
   reads ix_tasks_claim in the index's order: with no ORDER BY the planner sometimes chose
   a sequential scan with LIMIT 1, which reads every finished task at the front of the
   table before a queued one (measured: 1 ms per host, 35 ms for a 32-host claim, after
   25,000 of 51,000 tasks were done).

Additive only: workers of revision 0006 keep running their own settle statement and the
claim keeps its signature.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 09:00:00
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _claim_function_0006() -> str:
    """Revision 0006's trawler_claim(), the body this revision changes one step of."""
    path = Path(__file__).with_name("20261123_0006_claim_function.py")
    spec = importlib.util.spec_from_file_location("trawler_migration_0006", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load revision 0006 from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.CLAIM_FUNCTION)


MARK_FETCHED_0006 = """
    UPDATE tasks SET fetched_at = now()
    WHERE id = ANY(p_done) AND status = 'leased' AND lease_owner = p_worker
      AND fetched_at IS NULL;
"""
MARK_FETCHED = """
    --    (tasks the caller's writer is storing right now are skipped, not waited for)
    UPDATE tasks t SET fetched_at = now()
    FROM (SELECT d.id FROM tasks d
          WHERE d.id = ANY(p_done) AND d.status = 'leased' AND d.lease_owner = p_worker
            AND d.fetched_at IS NULL
          FOR NO KEY UPDATE OF d SKIP LOCKED) d
    WHERE t.id = d.id;
"""


DUE_PROBE_0006 = """
              AND (SELECT 1 FROM tasks t
                   WHERE t.host = h.host AND t.status = 'queued' AND t.next_attempt_at <= now()
                   LIMIT 1) IS NOT NULL
"""
DUE_PROBE = """
              --   (in the index's order: without an ORDER BY the planner may pick a
              --   sequential scan expecting a due task early on, and then read every task
              --   already done at the front of the table, per host)
              AND (SELECT 1 FROM tasks t
                   WHERE t.host = h.host AND t.status = 'queued' AND t.next_attempt_at <= now()
                   ORDER BY t.priority DESC, t.next_attempt_at, t.id
                   LIMIT 1) IS NOT NULL
"""


def _claim_function() -> str:
    body = _claim_function_0006()
    for old, new in ((MARK_FETCHED_0006, MARK_FETCHED), (DUE_PROBE_0006, DUE_PROBE)):
        if body.count(old) != 1:
            raise RuntimeError("revision 0006's claim function is not the one 0007 amends")
        body = body.replace(old, new)
    return body


SETTLE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION trawler_settle(
    p_jobs uuid[], p_n int[], p_r int[], p_s int[], p_f int[], p_k int[],
    p_l_job uuid[], p_l_url text[], p_l_hash bytea[], p_l_host text[], p_l_depth int[],
    p_channel text
) RETURNS TABLE (job_id uuid, drained bool, added bigint, notified bigint)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    -- 1. lock the jobs rows, in id order (NO KEY UPDATE, what the counters UPDATE needs
    --    anyway: the foreign-key checks of other transactions' page and task inserts, KEY
    --    SHARE, do not wait for it)
    PERFORM 1 FROM jobs j
    WHERE j.id IN (SELECT unnest(p_jobs) UNION SELECT unnest(p_l_job))
    ORDER BY j.id
    FOR NO KEY UPDATE OF j;
    -- 2. settle, in a snapshot taken after the locks were granted: every link the previous
    --    holder of a lock added is visible, so only links really new are numbered against
    --    the job's follow.max_pages
    RETURN QUERY
    WITH d AS (
        SELECT * FROM unnest(p_jobs, p_n, p_r, p_s, p_f, p_k) AS d(job_id, n, r, s, f, k)
    ), l AS (
        SELECT * FROM unnest(p_l_job, p_l_url, p_l_hash, p_l_host, p_l_depth)
            WITH ORDINALITY AS l(job_id, url, h, host, depth, ord)
    ), locked AS MATERIALIZED (
        SELECT j.id, j.total, j.status, j.priority, j.max_attempts,
               coalesce(CAST(j.spec -> 'follow' ->> 'max_pages' AS int), 2147483647) AS cap
        FROM jobs j WHERE j.id IN (SELECT d.job_id FROM d UNION SELECT l.job_id FROM l)
    ), fresh AS (
        -- a probe of the unique index per link (a scalar subquery with LIMIT is never
        -- turned into a join; as NOT EXISTS the planner compared every link with every
        -- task of the job)
        SELECT l.job_id, l.url, l.h, l.host, l.depth,
               row_number() OVER (PARTITION BY l.job_id ORDER BY l.ord) AS rn
        FROM l
        WHERE (SELECT 1 FROM tasks t WHERE t.job_id = l.job_id AND t.url_hash = l.h LIMIT 1)
              IS NULL
    ), ins AS (
        INSERT INTO tasks (job_id, url, url_hash, host, depth, priority, max_attempts)
        SELECT f.job_id, f.url, f.h, f.host, f.depth, k.priority, k.max_attempts
        FROM fresh f JOIN locked k ON k.id = f.job_id
        WHERE k.status IN ('queued', 'running') AND f.rn <= greatest(k.cap - k.total, 0)
        ON CONFLICT (job_id, url_hash) DO NOTHING
        RETURNING tasks.job_id, tasks.host
    ), added_per_job AS (
        SELECT ins.job_id, count(*) AS c FROM ins GROUP BY ins.job_id
    ), host_rows AS (
        INSERT INTO hosts (host) SELECT DISTINCT ins.host FROM ins ON CONFLICT DO NOTHING
    ), sent AS (
        SELECT pg_notify(p_channel, '') FROM (SELECT 1 FROM ins LIMIT 1) x
    ), counted AS (
        UPDATE jobs j SET
            running = j.running - coalesce(d.n, 0),
            queued = j.queued + coalesce(d.r, 0) + coalesce(a.c, 0),
            total = j.total + coalesce(a.c, 0),
            succeeded = j.succeeded + coalesce(d.s, 0), failed = j.failed + coalesce(d.f, 0),
            skipped = j.skipped + coalesce(d.k, 0), updated_at = now()
        FROM locked k LEFT JOIN d ON d.job_id = k.id LEFT JOIN added_per_job a ON a.job_id = k.id
        WHERE j.id = k.id
        RETURNING j.id, j.queued, j.running, coalesce(a.c, 0) AS c
    )
    SELECT c.id, c.queued = 0 AND c.running = 0, c.c, (SELECT count(*) FROM sent)
    FROM counted c;
END
$fn$
"""


def upgrade() -> None:
    op.execute(SETTLE_FUNCTION)
    op.execute(_claim_function())


def downgrade() -> None:
    op.execute(_claim_function_0006())
    op.execute(
        "DROP FUNCTION IF EXISTS trawler_settle(uuid[], int[], int[], int[], int[], int[], "
        "uuid[], text[], bytea[], text[], int[], text)"
    )
