"""task_queue (migration 0008): a task's trip through the queue writes no index entry of
the tasks table; every way a task becomes queued gives it a queue row, every way it ends
takes the row away."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.database.connection import ConnectionManager
from app.services import jobs, queue
from app.services.queue import Outcome
from tests.integration.test_lock_order import leased
from tests.support.jobs import create_job, task_counts

# what the executor writes into a tasks row as a task ends
OUTCOME_COLUMNS = {"status", "attempts", "last_error", "updated_at", "next_attempt_at"}


async def _tasks_updates(conn: AsyncConnection) -> tuple[int, int]:
    """(updates, HOT updates) of the tasks table in this connection's transaction."""
    row = (
        await conn.execute(
            text(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
                "WHERE relid = 'tasks'::regclass"
            )
        )
    ).one()
    return int(row[0]), int(row[1])


async def _queue_rows(db: ConnectionManager, job_id: uuid.UUID) -> int:
    async with db.connect() as conn:
        value = await conn.execute(
            text("SELECT count(*) FROM task_queue WHERE job_id = :j"), {"j": job_id}
        )
        return int(value.scalar_one())


async def test_no_index_of_tasks_covers_a_column_a_task_ends_with(db: ConnectionManager) -> None:
    """An index on any of them (key, expression or predicate) would make the completion's
    update non-HOT again: an entry in every index of the table per task."""
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                """
                SELECT i.indexrelid::regclass::text, a.attname
                FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
                WHERE i.indrelid = 'tasks'::regclass AND a.attnum > 0
                  AND (a.attnum = ANY(i.indkey)
                       OR pg_get_expr(i.indexprs, i.indrelid) ~ ('\\m' || a.attname || '\\M')
                       OR pg_get_expr(i.indpred, i.indrelid) ~ ('\\m' || a.attname || '\\M'))
                """
            )
        )
        indexed = {(index, column) for index, column in rows.all()}
    assert {column for _, column in indexed} == {"id", "job_id", "url_hash"}, indexed
    assert not {column for _, column in indexed} & OUTCOME_COLUMNS


async def test_claim_writes_no_tasks_row_and_completion_is_a_hot_update(
    db: ConnectionManager,
) -> None:
    job_id = await create_job(db, [f"http://site.example/p/{i}" for i in range(6)])
    worker = uuid.uuid4()
    async with db.engine.connect() as conn:
        # one transaction, so that its own statistics count both steps
        claim = await queue.claim(conn, worker, 6, 60.0)
        ids = sorted(t.id for t in claim.tasks)
        assert len(ids) == 6
        assert await _tasks_updates(conn) == (0, 0), "the claim wrote tasks rows"
        states = ["succeeded", "failed", "skipped", "retry", "succeeded", "failed"]
        outcomes = [
            Outcome(i, job_id, s, retry_in_s=60.0) for i, s in zip(ids, states, strict=True)
        ]
        await queue.complete(conn, worker, outcomes)
        assert await _tasks_updates(conn) == (6, 6), "a completion's update was not HOT"
        await conn.commit()
    counts = await task_counts(db, job_id)
    assert counts == {"succeeded": 2, "failed": 2, "skipped": 1, "queued": 1}, counts
    # only the retried task keeps a queue row: waiting, due in a minute, attempt 1 counted
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT task_id, lease_owner, attempts, next_attempt_at > now() "
                "FROM task_queue WHERE job_id = :j"
            ),
            {"j": job_id},
        )
        assert [tuple(r) for r in rows.all()] == [(ids[3], None, 1, True)]
        attempts = await conn.execute(
            text("SELECT id, attempts FROM tasks WHERE job_id = :j ORDER BY id"), {"j": job_id}
        )
        assert [a for _, a in attempts.all()] == [1] * 6


async def test_every_task_inserted_queued_gets_a_queue_row_and_no_other(
    db: ConnectionManager,
) -> None:
    job_id = await create_job(db, [f"http://t.example/{i}" for i in range(5)])
    assert await _queue_rows(db, job_id) == 5
    async with db.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO tasks (job_id, url, url_hash, host, status, priority) VALUES "
                "(:j, 'http://t.example/done', sha256('d'), 't.example', 'succeeded', 0), "
                "(:j, 'http://t.example/new', sha256('n'), 't.example', 'queued', 7)"
            ),
            {"j": job_id},
        )
        rows = await conn.execute(
            text(
                "SELECT t.url, q.priority, q.host FROM task_queue q JOIN tasks t "
                "ON t.id = q.task_id WHERE t.url LIKE '%/new' OR t.url LIKE '%/done'"
            )
        )
        assert [tuple(r) for r in rows.all()] == [("http://t.example/new", 7, "t.example")]
        # crawl links added by a completion's settle come in through the same trigger
        added = await queue.enqueue_links(conn, job_id, [("http://t.example/link", 1)])
        assert added == 1
    assert await _queue_rows(db, job_id) == 7


async def test_cancel_retry_and_resume_keep_the_queue_rows_right(db: ConnectionManager) -> None:
    tenant = "test"  # create_job's
    job_id, worker, ids = await leased(db, 4)
    async with db.session() as session:
        await jobs.cancel_job(session, tenant, job_id)
    assert await _queue_rows(db, job_id) == 0
    assert await task_counts(db, job_id) == {"cancelled": 4}
    # the worker that held the leases stores nothing
    async with db.connect() as conn:
        await queue.complete(conn, worker, [Outcome(ids[0], job_id, "succeeded")])
    assert await task_counts(db, job_id) == {"cancelled": 4}

    async with db.session() as session:
        job = await jobs.resume_job(session, tenant, job_id)
    assert job.status == "queued" and job.progress.queued == 4
    assert await _queue_rows(db, job_id) == 4

    # run it to the end, one task failing, then retry the failure
    other = uuid.uuid4()
    async with db.connect() as conn:
        claim = await queue.claim(conn, other, 10, 60.0)
        await queue.mark_jobs_running(conn, [job_id])
        states = ["succeeded", "failed", "succeeded", "succeeded"]
        outcomes = [Outcome(t.id, job_id, s) for t, s in zip(claim.tasks, states, strict=True)]
        assert len(outcomes) == 4
        await queue.complete(conn, other, outcomes)
    assert await _queue_rows(db, job_id) == 0
    async with db.session() as session:
        job = await jobs.retry_job(session, tenant, job_id)
    assert job.progress.queued == 1 and job.progress.succeeded == 3
    async with db.connect() as conn:
        rows = await conn.execute(
            text("SELECT task_id, attempts, lease_owner FROM task_queue WHERE job_id = :j"),
            {"j": job_id},
        )
        assert [tuple(r) for r in rows.all()] == [(claim.tasks[1].id, 0, None)]
