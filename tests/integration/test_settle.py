"""Settling crawl links under concurrency: the max_pages cap counts only links really new.

Two completions of one crawl job settle one after the other (the jobs row lock). The second
must see the links the first one added while it waited: counted as new, they would use up
cap slots, be dropped as duplicates, and cut real links the cap still had room for.
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import text

from app.database.connection import ConnectionManager
from app.services import queue
from tests.support.jobs import create_job, job_row


async def crawl_job(db: ConnectionManager, seed: str, max_pages: int) -> uuid.UUID:
    job_id = await create_job(db, [seed])
    async with db.connect() as conn:
        await conn.execute(
            text(
                "UPDATE jobs SET kind = 'crawl', spec = jsonb_set(spec, '{follow}', "
                "CAST(:follow AS jsonb)) WHERE id = :id"
            ),
            {"id": job_id, "follow": f'{{"max_pages": {max_pages}, "max_depth": 3}}'},
        )
    return job_id


async def task_urls(db: ConnectionManager, job_id: uuid.UUID) -> set[str]:
    async with db.connect() as conn:
        rows = await conn.execute(text("SELECT url FROM tasks WHERE job_id = :id"), {"id": job_id})
        return {r[0] for r in rows}


async def wait_for_lock_wait(db: ConnectionManager, pid: int) -> None:
    """Until backend `pid` waits for a lock (its statement has started: snapshot taken)."""
    for _ in range(500):
        async with db.connect() as conn:
            waiting = (
                await conn.execute(
                    text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"),
                    {"p": pid},
                )
            ).scalar_one_or_none()
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")


async def test_a_waiting_settle_sees_the_links_added_meanwhile(db: ConnectionManager) -> None:
    base = "http://site.example"
    job_id = await crawl_job(db, f"{base}/", max_pages=3)  # the seed: 1 task of 3
    first, second = f"{base}/a", f"{base}/b"

    async with db.engine.connect() as holder, db.engine.connect() as waiter:
        await holder.begin()
        # the first completion adds /a and keeps the job row locked until it commits
        assert await queue.enqueue_links(holder, job_id, [(first, 1)]) == 1
        # (this autobegins the waiter's transaction)
        waiter_pid = (await waiter.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        # the second found /a too, and /b: it waits for the job row
        settle = asyncio.create_task(queue.enqueue_links(waiter, job_id, [(first, 1), (second, 1)]))
        await wait_for_lock_wait(db, waiter_pid)
        await holder.commit()
        added = await asyncio.wait_for(settle, 10)
        await waiter.commit()

    # one slot was left (3 - seed - /a): /b takes it; /a is no new task and takes none
    assert added == 1
    assert await task_urls(db, job_id) == {f"{base}/", first, second}
    row = await job_row(db, job_id)
    assert (row["total"], row["queued"]) == (3, 3)


async def test_the_cap_still_cuts_truly_new_links(db: ConnectionManager) -> None:
    base = "http://site.example"
    job_id = await crawl_job(db, f"{base}/", max_pages=3)
    async with db.connect() as conn:
        added = await queue.enqueue_links(
            conn, job_id, [(f"{base}/{n}", 1) for n in range(5)] + [(f"{base}/", 1)]
        )
    assert added == 2
    assert await task_urls(db, job_id) == {f"{base}/", f"{base}/0", f"{base}/1"}
    assert (await job_row(db, job_id))["total"] == 3
