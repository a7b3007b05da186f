"""Retention: delete finished jobs whose retain_days have run out, in bounded batches.

A job's expires_at is set when it reaches a terminal state (finished_at + retain_days;
NULL keeps it forever) and cleared when it is reopened (retry, resume). Every worker runs
purge_expired periodically; jobs are locked FOR UPDATE SKIP LOCKED, so workers purging at
the same time take disjoint jobs, and a job its owner is retrying or deleting right now is
left for the next round. The status is re-checked under the lock: a queued or running job
is never touched. A job whose webhook deliveries are still pending is kept until they end.

Each unit of work deletes at most `batch` rows of one table (pages, then webhook
deliveries, events, tasks), then the jobs, and commits; a large job takes several units.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.database.connection import ConnectionManager
from app.database.models import (
    TERMINAL_JOB_STATUSES,
    Job,
    JobEvent,
    Page,
    Task,
    WebhookDelivery,
)

logger = logging.getLogger(__name__)

_TERMINAL = sorted(s.value for s in TERMINAL_JOB_STATUSES)


@dataclass
class PurgeResult:
    jobs: int = 0
    pages: int = 0


def _expired_jobs(batch: int) -> Any:
    return (
        select(Job.id)
        .where(
            Job.expires_at <= text("now()"),
            Job.status.in_(_TERMINAL),
            ~select(WebhookDelivery.id)
            .where(WebhookDelivery.job_id == Job.id, WebhookDelivery.status == "pending")
            .exists(),
        )
        .order_by(Job.expires_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )


async def delete_jobs(
    conn: AsyncConnection, ids: list[uuid.UUID], batch: int, *still: Any
) -> tuple[int, int, bool]:
    """Delete locked jobs and what they own, at most `batch` rows per table per call.

    Children go first (pages, webhook deliveries, events, tasks). Returns (jobs deleted,
    pages deleted, finished): when a child table hit its bound, the jobs are still there
    (finished False) and the caller commits and calls again; terminal jobs get no new
    rows. `still` are conditions the job rows must still meet to be deleted.
    """
    pages = 0
    for model in (Page, WebhookDelivery, JobEvent, Task):
        table: Any = model.__table__
        doomed = select(table.c.id).where(table.c.job_id.in_(ids)).limit(batch)
        result = await conn.execute(delete(table).where(table.c.id.in_(doomed)))
        count = int(getattr(result, "rowcount", 0) or 0)
        if model is Page:
            pages = count
        if count >= batch:
            return 0, pages, False
    gone = await conn.execute(delete(Job).where(Job.id.in_(ids), *still))
    return int(getattr(gone, "rowcount", 0) or 0), pages, True


async def _purge_batch(conn: AsyncConnection, batch: int) -> tuple[int, int, bool]:
    """One unit of work; returns (jobs deleted, pages deleted, more to do)."""
    ids: list[uuid.UUID] = list((await conn.execute(_expired_jobs(batch))).scalars())
    if not ids:
        return 0, 0, False
    jobs, pages, finished = await delete_jobs(
        conn, ids, batch, Job.status.in_(_TERMINAL), Job.expires_at.is_not(None)
    )
    return jobs, pages, not finished or len(ids) >= batch


async def purge_expired(
    db: ConnectionManager, *, batch: int, max_batches: int | None = None
) -> PurgeResult:
    """Delete expired jobs with everything they own, one committed batch at a time.

    `max_batches` bounds one call (the executor's loop comes back later for the rest).
    """
    result = PurgeResult()
    done = 0
    while max_batches is None or done < max_batches:
        async with db.connect() as conn:
            jobs, pages, more = await _purge_batch(conn, batch)
        done += 1
        result.jobs += jobs
        result.pages += pages
        if not more:
            break
    if result.jobs or result.pages:
        logger.info("retention: deleted %d expired jobs, %d pages", result.jobs, result.pages)
    return result
