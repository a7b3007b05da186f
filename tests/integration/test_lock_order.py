"""Task rows are locked in one order (by id) or not waited for: a worker's writer, its
heartbeat and a job's cancellation working on the same leased tasks never deadlock.

Measured before: with a heartbeat every 0.2 s on a busy queue, most lease renewals and
many completions were aborted as deadlock victims (each after deadlock_timeout, 1 s).
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import text

from app.database.connection import ConnectionManager
from app.services import queue
from app.services.queue import Outcome
from tests.integration.test_settle import wait_for_lock_wait
from tests.support.jobs import create_job, task_counts


async def leased(
    db: ConnectionManager, n: int = 0, urls: list[str] | None = None
) -> tuple[uuid.UUID, uuid.UUID, list[int]]:
    """A job of tasks, all leased to one (fictitious) worker: (job, worker, task ids in
    the order of `urls`, which is their id order)."""
    urls = urls or [f"http://site.example/p/{i}" for i in range(n)]
    job_id = await create_job(db, urls)
    worker = uuid.uuid4()
    async with db.connect() as conn:
        claim = await queue.claim(conn, worker, len(urls), 60.0)
    by_url = {t.url: t.id for t in claim.tasks}
    ids = [by_url[u] for u in urls]
    assert ids == sorted(ids)
    return job_id, worker, ids


async def test_lease_renewal_skips_rows_being_completed(db: ConnectionManager) -> None:
    _job_id, worker, ids = await leased(db, 3)
    async with db.engine.connect() as writer, db.engine.connect() as beat:
        # the writer is storing the outcome of the middle task: its row is locked
        await writer.begin()
        await writer.execute(
            text("SELECT 1 FROM task_queue WHERE task_id = :id FOR NO KEY UPDATE"),
            {"id": ids[1]},
        )
        # the heartbeat neither waits for it (lock_timeout would fail the statement) nor
        # renews it; the two others are renewed
        await beat.execute(text("SET LOCAL lock_timeout = '2s'"))
        renewed = await asyncio.wait_for(queue.renew_leases(beat, worker, 600.0, ids), 5)
        assert renewed == 2
        await beat.commit()
        await writer.rollback()
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT task_id, lease_expires_at > now() + interval '300 seconds' "
                "FROM task_queue WHERE task_id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        assert dict(rows.all()) == {ids[0]: True, ids[1]: False, ids[2]: True}


async def test_lease_renewal_renews_only_this_workers_leases(db: ConnectionManager) -> None:
    _job_id, worker, ids = await leased(db, 2)
    async with db.connect() as conn:
        assert await queue.renew_leases(conn, uuid.uuid4(), 600.0, ids) == 0
        assert await queue.renew_leases(conn, worker, 600.0, ids) == 2


async def test_completion_locks_its_tasks_in_id_order(db: ConnectionManager) -> None:
    """A cancellation locks a job's tasks in id order. A completion listing its outcomes
    in another order must not hold a higher row while it waits for a lower one. (The
    higher task's host sorts first: whether the plan follows the outcomes' order or reads
    the leased tasks by host, the statement before would have locked it first.)"""
    job_id, worker, ids = await leased(db, urls=["http://b.example/1", "http://a.example/1"])
    low, high = ids
    outcomes = [Outcome(high, job_id, "succeeded"), Outcome(low, job_id, "succeeded")]
    async with db.engine.connect() as canceller, db.engine.connect() as writer:
        await canceller.begin()
        await canceller.execute(
            text("SELECT 1 FROM task_queue WHERE task_id = :id FOR UPDATE"), {"id": low}
        )
        writer_pid = (await writer.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        completing = asyncio.create_task(queue.complete(writer, worker, outcomes))
        await wait_for_lock_wait(db, writer_pid)  # waiting for `low`
        # the cancellation goes on to the next row: free, since the completion waits for
        # `low` before it locks `high` (in outcome order it would hold `high`: deadlock)
        await canceller.execute(text("SET LOCAL lock_timeout = '2s'"))
        await canceller.execute(
            text("SELECT 1 FROM task_queue WHERE task_id = :id FOR UPDATE"), {"id": high}
        )
        await canceller.rollback()
        await asyncio.wait_for(completing, 10)
        await writer.commit()
    assert await task_counts(db, job_id) == {"succeeded": 2}


async def test_completion_after_a_cancellation_stores_nothing(db: ConnectionManager) -> None:
    """The lease is checked on the row as locked: a task cancelled while the completion
    waited for it keeps its cancelled status."""
    job_id, worker, ids = await leased(db, 2)
    async with db.engine.connect() as canceller, db.engine.connect() as writer:
        await canceller.begin()
        await canceller.execute(
            text(
                "WITH ended AS (DELETE FROM task_queue WHERE task_id = :id RETURNING task_id) "
                "UPDATE tasks SET status = 'cancelled' FROM ended WHERE id = ended.task_id"
            ),
            {"id": ids[0]},
        )
        writer_pid = (await writer.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        outcomes = [Outcome(i, job_id, "succeeded") for i in ids]
        completing = asyncio.create_task(queue.complete(writer, worker, outcomes))
        await wait_for_lock_wait(db, writer_pid)
        await canceller.commit()
        await asyncio.wait_for(completing, 10)
        await writer.commit()
    assert await task_counts(db, job_id) == {"cancelled": 1, "succeeded": 1}
