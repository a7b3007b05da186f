"""POST /jobs/{id}/resume: a cancelled crawl continues from its frontier."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from app.config import Settings
from app.database.connection import ConnectionManager
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.support.jobs import job_row, pages_of, pages_stored_twice, task_counts, wait_terminal
from tests.support.site import LocalSite
from tests.support.webhook_receiver import WebhookReceiver

Headers = dict[str, str]


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url, webhook_poll_interval=0.1, shutdown_grace=1.0)


@pytest.fixture
async def site() -> AsyncIterator[LocalSite]:
    async with LocalSite().serve() as s:
        s.delay = 0.1  # a chain of pages, one hop at a time: time to cancel half-way
        yield s


async def test_a_cancelled_crawl_resumes_from_its_frontier(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
    site: LocalSite,
    settings: Settings,
) -> None:
    async with WebhookReceiver().serve() as receiver:
        response = await client.post(
            "/api/v1/crawl",
            json={
                "seeds": [site.url("/page/0")],
                "follow": {"max_pages": 12, "max_depth": 50},
                "politeness": {"respect_robots": False},
                "webhook": {"url": receiver.hook_url},
            },
            headers=auth_headers,
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        resume = f"/api/v1/jobs/{job_id}/resume"
        # only a cancelled job resumes
        assert (await client.post(resume, headers=auth_headers)).status_code == 409

        executor = AsyncJobExecutor(ConnectionManager(settings), settings)
        await executor.start()
        try:
            deadline = time.monotonic() + 20
            while (await job_row(db, uuid.UUID(job_id)))["succeeded"] < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            cancelled = await client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth_headers)
            assert cancelled.json()["status"] == "cancelled"
            stopped_at = len(await pages_of(db, uuid.UUID(job_id)))
            assert stopped_at < 12
            assert (await task_counts(db, uuid.UUID(job_id))).get("cancelled", 0) >= 1

            assert (await client.post(resume, headers=other_headers)).status_code == 404
            resumed = await client.post(resume, headers=auth_headers)
            assert resumed.status_code == 200, resumed.text
            assert resumed.json()["status"] == "queued"
            row = await wait_terminal(db, uuid.UUID(job_id))
            await receiver.wait_for(lambda r: len(r.accepted()) >= 4)
        finally:
            await executor.stop(grace=1.0)
            await executor.db.dispose()

    assert row["status"] == "completed"
    assert (row["total"], row["succeeded"], row["queued"], row["running"]) == (12, 12, 0, 0)
    pages = await pages_of(db, uuid.UUID(job_id))
    assert sorted(p["url"] for p in pages) == sorted(site.url(f"/page/{n}") for n in range(12))
    assert await pages_stored_twice(db, uuid.UUID(job_id)) == {}
    assert await task_counts(db, uuid.UUID(job_id)) == {"succeeded": 12}
    # a finished job does not resume
    assert (await client.post(resume, headers=auth_headers)).status_code == 409
    # the webhook heard both lives of the job, each terminal event once
    assert Counter(r.event for r in receiver.received) == Counter(
        {"job.started": 2, "job.cancelled": 1, "job.completed": 1}
    )
