"""Job status transitions: the one place a job's status changes, with an event row each
and, for jobs with a webhook, the outbox row of the matching webhook event."""

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


# Webhook event of each status (the outbox rows written by a transition); queued (a
# retry or resume reopening the job) has none
WEBHOOK_EVENTS: dict[JobStatus, str] = {
    JobStatus.running: "job.started",
    JobStatus.completed: "job.completed",
    JobStatus.failed: "job.failed",
    JobStatus.cancelled: "job.cancelled",
}


def utc_text(column: str) -> str:
    """SQL rendering a timestamptz as the API renders it (ISO 8601, UTC, 'Z'), whatever
    the session's TimeZone."""
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


def job_json(alias: str) -> str:
    """SQL building the job resource (JobPublic's JSON) from a jobs row named `alias`."""
    a = alias
    return f"""jsonb_build_object(
        'id', {a}.id, 'kind', {a}.kind, 'status', {a}.status, 'priority', {a}.priority,
        'created_at', {utc_text(f"{a}.created_at")},
        'started_at', {utc_text(f"{a}.started_at")},
        'finished_at', {utc_text(f"{a}.finished_at")},
        'progress', jsonb_build_object('total', {a}.total, 'queued', {a}.queued,
                                       'running', {a}.running, 'succeeded', {a}.succeeded,
                                       'failed', {a}.failed),
        'error', {a}.error, 'spec', {a}.spec)"""


# One statement: move every matching job, write its event row, write the webhook outbox
# row of each job whose webhook wants this event (the job resource as it is now), and
# NOTIFY listeners (SSE streams, workers watching for cancellation or for deliveries) —
# all delivered or rolled back together, so nobody hears of a change that was rolled back
# and no committed change goes unannounced. A terminal status also starts the retention
# clock (expires_at); reopening the job stops it.
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
                     ELSE error END,
        expires_at = CASE WHEN CAST(:to AS text) IN ('completed', 'failed', 'cancelled')
                          THEN now() + make_interval(days => retain_days) END
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status = ANY(CAST(:sources AS text[])) {extra}
    RETURNING id, kind, status, priority, created_at, started_at, finished_at,
              total, queued, running, succeeded, failed, error, spec
), hooks AS (
    INSERT INTO webhook_deliveries (job_id, event, payload)
    SELECT m.id, CAST(:event AS text), jsonb_build_object('job', {job})
    FROM moved m JOIN job_webhooks w ON w.job_id = m.id
    WHERE CAST(:event AS text) = ANY(w.events)
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
    sql = _TRANSITION_SQL.format(extra=f"AND ({only_if})" if only_if else "", job=job_json("m"))
    result = await conn.execute(
        text(sql),
        {
            "to": to.value,
            "ids": ids,
            "sources": sources_of(to),
            "error": error,
            "data": orjson.dumps(data or {}).decode(),
            "channel": NOTIFY_JOBS,
            "event": WEBHOOK_EVENTS.get(to),
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
