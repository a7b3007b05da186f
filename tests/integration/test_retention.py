"""Retention: retain_days, expires_at set by the status transition, the batched purge."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text

from app.api.schemas import ScrapeCreate
from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.models import JobStatus
from app.services import jobs, retention, state
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.support.jobs import create_job, job_row, scalar
from tests.support.site import LocalSite

Headers = dict[str, str]


async def run(db: ConnectionManager, statement: str, **params: object) -> None:
    async with db.connect() as conn:
        await conn.execute(text(statement), params)


async def finished_job(
    db: ConnectionManager,
    status: str,
    expires_in: str | None,
    *,
    pages: int = 3,
    delivery: str | None = "delivered",
) -> uuid.UUID:
    """A job in `status` with tasks, pages, an event and a webhook delivery, expiring at
    now() + `expires_in` (an SQL interval; None: never)."""
    job_id = await create_job(db, [f"http://127.0.0.1:9/{n}" for n in range(pages)])
    await run(
        db,
        "UPDATE jobs SET status = :status, retain_days = 1, finished_at = now(), "
        "expires_at = now() + CAST(CAST(:expires AS text) AS interval) WHERE id = :id",
        status=status,
        expires=expires_in,
        id=job_id,
    )
    await run(
        db,
        "INSERT INTO pages (job_id, task_id, url, ok) "
        "SELECT job_id, id, url, true FROM tasks WHERE job_id = :id",
        id=job_id,
    )
    await run(db, "INSERT INTO job_events (job_id, type) VALUES (:id, 'status')", id=job_id)
    if delivery is not None:
        await run(
            db,
            "INSERT INTO job_webhooks (job_id, url, events) "
            "VALUES (:id, 'http://127.0.0.1:9/h', ARRAY['job.completed'])",
            id=job_id,
        )
        await run(
            db,
            "INSERT INTO webhook_deliveries (job_id, event, status) "
            "VALUES (:id, 'job.completed', :status)",
            id=job_id,
            status=delivery,
        )
    return job_id


async def rows_of(db: ConnectionManager, job_id: uuid.UUID) -> dict[str, int]:
    counts = {}
    for table in ("jobs", "tasks", "pages", "job_events", "webhook_deliveries", "job_webhooks"):
        column = "id" if table == "jobs" else "job_id"
        counts[table] = int(
            await scalar(db, f"SELECT count(*) FROM {table} WHERE {column} = :id", id=job_id)
        )
    return counts


async def test_purge_deletes_expired_jobs_in_bounded_batches_and_nothing_else(
    db: ConnectionManager,
) -> None:
    expired = [
        await finished_job(db, status, "-1 minute")
        for status in ("completed", "failed", "cancelled", "completed", "failed")
    ]
    kept = {
        "running": await finished_job(db, "running", "-1 minute"),
        "queued": await finished_job(db, "queued", "-1 minute"),
        "not yet": await finished_job(db, "completed", "1 day"),
        "forever": await finished_job(db, "completed", None),
        "webhook pending": await finished_job(db, "completed", "-1 minute", delivery="pending"),
    }
    before = {name: await rows_of(db, job_id) for name, job_id in kept.items()}

    # one unit of work deletes at most `batch` rows of one table, then commits
    first = await retention.purge_expired(db, batch=2, max_batches=1)
    assert (first.jobs, first.pages) == (0, 2)
    assert await scalar(db, "SELECT count(*) FROM pages") == 10 * 3 - 2

    rest = await retention.purge_expired(db, batch=2)
    assert rest.jobs == 5 and first.pages + rest.pages == 15
    for job_id in expired:
        assert set((await rows_of(db, job_id)).values()) == {0}, job_id
    for name, job_id in kept.items():
        assert await rows_of(db, job_id) == before[name], name

    # the pending delivery ends: the job goes at the next purge
    await run(
        db,
        "UPDATE webhook_deliveries SET status = 'delivered' WHERE job_id = :id",
        id=kept["webhook pending"],
    )
    assert (await retention.purge_expired(db, batch=100)).jobs == 1
    assert await scalar(db, "SELECT count(*) FROM jobs") == 4


async def test_retain_days_default_and_expiry_follow_the_status(db: ConnectionManager) -> None:
    url = "http://127.0.0.1:9/x"

    async def submit(**fields: object) -> uuid.UUID:
        request = ScrapeCreate.model_validate({"urls": [url], **fields})
        async with db.session() as session:
            job, _ = await jobs.submit_job(session, "t", request, default_retain_days=7)
        return job.id

    explicit, default, forever = (
        await submit(retain_days=3),
        await submit(),
        await submit(retain_days=None),
    )
    for job_id, days in ((explicit, 3), (default, 7), (forever, None)):
        row = await job_row(db, job_id)
        assert row["retain_days"] == days and row["expires_at"] is None
        assert row["spec"].get("retain_days") == days

    for job_id in (explicit, default, forever):
        async with db.connect() as conn:
            await state.transition(conn, job_id, JobStatus.running)
            await state.transition(conn, job_id, JobStatus.completed)
    for job_id, days in ((explicit, 3), (default, 7)):
        row = await job_row(db, job_id)
        assert row["expires_at"] == row["finished_at"] + timedelta(days=days)
    assert (await job_row(db, forever))["expires_at"] is None

    # a retry reopens the job: the clock stops until it finishes again
    async with db.connect() as conn:
        await state.transition(conn, explicit, JobStatus.queued)
    assert (await job_row(db, explicit))["expires_at"] is None


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url, retention_interval_s=0.2, shutdown_grace=1.0)


@pytest.fixture
async def site() -> AsyncIterator[LocalSite]:
    async with LocalSite().serve() as s:
        yield s


async def test_executor_purges_a_job_whose_retention_ran_out(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    site: LocalSite,
    settings: Settings,
) -> None:
    keep = await client.post(
        "/api/v1/scrape", json={"urls": [site.url("/page/1")]}, headers=auth_headers
    )
    # retain_days 0: deleted by the first purge after it finishes
    response = await client.post(
        "/api/v1/scrape",
        json={"urls": [site.url("/page/2"), site.url("/page/3")], "retain_days": 0},
        headers=auth_headers,
    )
    assert response.status_code == 202 and keep.status_code == 202
    job_id = response.json()["id"]
    assert response.json()["spec"]["retain_days"] == 0

    executor = AsyncJobExecutor(ConnectionManager(settings), settings)
    await executor.start()
    try:
        deadline = time.monotonic() + 20
        while (await client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers)).status_code != 404:
            assert time.monotonic() < deadline, "the expired job was not purged"
            await asyncio.sleep(0.1)
        assert executor.stats.purged_jobs == 1
        kept = await client.get(f"/api/v1/jobs/{keep.json()['id']}", headers=auth_headers)
        assert kept.status_code == 200 and kept.json()["status"] == "completed"
        assert await scalar(db, "SELECT count(*) FROM pages WHERE job_id = :id", id=job_id) == 0
    finally:
        await executor.stop(grace=1.0)
        await executor.db.dispose()
