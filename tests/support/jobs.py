"""Create jobs straight in the database (for executor tests that bypass the API)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
from sqlalchemy import text

from app.database.connection import ConnectionManager
from app.services import frontier


async def create_job(
    db: ConnectionManager,
    urls: list[str],
    *,
    extract: dict[str, Any] | None = None,
    max_attempts: int = 3,
    tenant: str = "test",
    options: dict[str, Any] | None = None,
    host_limit: int | None = 64,
) -> uuid.UUID:
    """A scrape job with its tasks; `host_limit` sets the hosts' politeness (None: default)."""
    job_id = uuid.uuid4()
    spec = {"urls": urls, "extract": extract or {}, "options": options or {"timeout_s": 5}}
    async with db.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO jobs (id, tenant, kind, spec, max_attempts) "
                "VALUES (:id, :tenant, 'scrape', CAST(:spec AS jsonb), :ma)"
            ),
            {
                "id": job_id,
                "tenant": tenant,
                "spec": orjson.dumps(spec).decode(),
                "ma": max_attempts,
            },
        )
        rows = frontier.prepare((u, 0) for u in urls)
        await frontier.enqueue(conn, job_id, rows, priority=0, max_attempts=max_attempts)
        if host_limit is not None:
            await conn.execute(
                text("UPDATE hosts SET max_concurrency = :n WHERE host = ANY(:hosts)"),
                {"n": host_limit, "hosts": sorted({r[2] for r in rows})},
            )
    return job_id


async def job_row(db: ConnectionManager, job_id: uuid.UUID) -> dict[str, Any]:
    async with db.connect() as conn:
        row = (
            (await conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}))
            .mappings()
            .one()
        )
        return dict(row)


async def pages_of(db: ConnectionManager, job_id: uuid.UUID) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        rows = (
            (
                await conn.execute(
                    text("SELECT * FROM pages WHERE job_id = :id ORDER BY id"), {"id": job_id}
                )
            )
            .mappings()
            .all()
        )
        return [dict(r) for r in rows]


async def task_counts(db: ConnectionManager, job_id: uuid.UUID) -> dict[str, int]:
    async with db.connect() as conn:
        rows = await conn.execute(
            # a task with a lease (its task_queue row's) counts as leased
            text(
                "SELECT CASE WHEN q.lease_owner IS NOT NULL THEN 'leased' "
                "ELSE CAST(t.status AS text) END, count(*) "
                "FROM tasks t LEFT JOIN task_queue q ON q.task_id = t.id "
                "WHERE t.job_id = :id GROUP BY 1"
            ),
            {"id": job_id},
        )
        return {r[0]: r[1] for r in rows}


TERMINAL = ("completed", "failed", "cancelled")


async def wait_terminal(
    db: ConnectionManager, job_id: uuid.UUID, timeout: float = 30.0
) -> dict[str, Any]:
    """The job row once its status is terminal; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    row = await job_row(db, job_id)
    while row["status"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {row['status']} after {timeout:.0f}s: {row}")
        await asyncio.sleep(0.1)
        row = await job_row(db, job_id)
    return row


async def scalar(db: ConnectionManager, statement: str, **params: Any) -> Any:
    """One value from one statement (committed state, on a connection of its own)."""
    async with db.connect() as conn:
        return (await conn.execute(text(statement), params)).scalar_one()


async def pages_stored_twice(db: ConnectionManager, job_id: uuid.UUID) -> dict[str, int]:
    """URLs of the job with more than one stored page (must be empty: stored exactly once)."""
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT url, count(*) FROM pages WHERE job_id = :id "
                "GROUP BY url HAVING count(*) > 1"
            ),
            {"id": job_id},
        )
        return {r[0]: r[1] for r in rows}
