"""Job status transitions: the one place a job's status changes, with an event row each."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.database.models import JobStatus

Executor = AsyncConnection | AsyncSession

# Which status may follow which. Terminal jobs reopen only through retry (-> queued).
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset(
        {JobStatus.completed, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}
    ),
    JobStatus.completed: frozenset({JobStatus.queued}),
    JobStatus.failed: frozenset({JobStatus.queued}),
    JobStatus.cancelled: frozenset({JobStatus.queued}),
}

TERMINAL = (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)
NOTIFY_JOBS = "trawler_jobs"


def sources_of(target: JobStatus) -> list[str]:
    return [s.value for s, targets in ALLOWED.items() if target in targets]


# One statement: move every matching job, write its event row, and NOTIFY listeners
# (SSE streams, workers watching for cancellation) — delivered only when the
# transaction commits, so nobody hears of a change that was rolled back.
_TRANSITION_SQL = """
WITH moved AS (
    UPDATE jobs SET
        status = CAST(:to AS text),
        updated_at = now(),
        started_at = CASE WHEN CAST(:to AS text) = 'running' THEN coalesce(started_at, now())
                          ELSE started_at END,
        finished_at = CASE WHEN CAST(:to AS text) IN ('completed', 'failed', 'cancelled') THEN now()
                           WHEN CAST(:to AS text) = 'queued' THEN NULL
                           ELSE finished_at END,
        error = CASE WHEN CAST(:to AS text) IN ('failed', 'cancelled')
                     THEN coalesce(CAST(:error AS text), error)
                     WHEN CAST(:to AS text) = 'queued' THEN NULL
                     ELSE error END
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status = ANY(CAST(:sources AS text[])) {extra}
    RETURNING id, status, total, queued, running, succeeded, failed
), events AS (
    INSERT INTO job_events (job_id, type, status, data)
    SELECT id, 'status', status,
           jsonb_build_object('total', total, 'queued', queued, 'running', running,
                              'succeeded', succeeded, 'failed', failed)
             || CAST(:data AS jsonb)
    FROM moved
)
SELECT id, pg_notify(CAST(:channel AS text), id::text || ':' || status) FROM moved
"""


async def transition(
    conn: Executor,
    job_ids: uuid.UUID | Sequence[uuid.UUID],
    to: JobStatus,
    *,
    error: str | None = None,
    data: dict[str, Any] | None = None,
    only_if: str = "",
) -> list[uuid.UUID]:
    """Move jobs to `to` where the current status allows it; returns the ids that moved.

    `only_if` is an extra SQL condition on the jobs row (for instance the completion test
    `queued = 0 AND running = 0`); it is code, never user input.
    """
    ids = [job_ids] if isinstance(job_ids, uuid.UUID) else list(job_ids)
    if not ids:
        return []
    sql = _TRANSITION_SQL.format(extra=f"AND ({only_if})" if only_if else "")
    result = await conn.execute(
        text(sql),
        {
            "to": to.value,
            "ids": ids,
            "sources": sources_of(to),
            "error": error,
            "data": orjson.dumps(data or {}).decode(),
            "channel": NOTIFY_JOBS,
        },
    )
    return [row[0] for row in result.all()]


async def finish_if_done(conn: Executor, job_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
    """Close jobs with no queued or leased task left: completed if any page succeeded."""
    ids = list(set(job_ids))
    if not ids:
        return []
    done = await transition(
        conn, ids, JobStatus.completed, only_if="queued = 0 AND running = 0 AND succeeded > 0"
    )
    failed = await transition(
        conn,
        ids,
        JobStatus.failed,
        error="every URL failed",
        only_if="queued = 0 AND running = 0 AND succeeded = 0",
    )
    return done + failed
