"""AsyncJobExecutor against a real PostgreSQL and a real local HTTP site."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import text

from app.config import Settings
from app.database.connection import ConnectionManager
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.support.executors import start_executor
from tests.support.jobs import create_job, job_row, pages_of, task_counts
from tests.support.site import LocalSite

EXTRACT = {
    "title": {"css": "h1", "value": "text"},
    "price": {"css": ".price", "value": "text"},
}


@pytest.fixture
async def site() -> AsyncIterator[LocalSite]:
    async with LocalSite().serve() as s:
        yield s


@pytest.fixture
def worker_settings(db_url: str) -> Settings:
    return make_settings(
        db_url,
        retry_base_s=0.05,
        retry_max_s=0.5,
        worker_stale_seconds=2.0,
        lease_seconds=30.0,
        worker_concurrency=16,
        shutdown_grace=2.0,
    )


ExecutorFactory = Callable[..., "asyncio.Future[AsyncJobExecutor]"]


async def wait_terminal(db: ConnectionManager, job_id: uuid.UUID, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await job_row(db, job_id)
        if row["status"] in ("completed", "failed", "cancelled"):
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"job still {row['status']} after {timeout}s: {row}")


async def crash(ex: AsyncJobExecutor) -> None:
    """Simulate kill -9: everything stops, nothing is released or deregistered."""
    tasks = [*ex._loops, *ex._inflight.values()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if ex._listener is not None:
        await ex._listener.stop()
    await ex.handler.close()
    ex._started = False
    await ex.db.dispose()


async def test_scrape_200_pages_stored_once_with_fields(
    db: ConnectionManager, site: LocalSite, worker_settings: Settings, executors: list
) -> None:
    urls = [site.url(f"/page/{n}") for n in range(200)]
    job_id = await create_job(db, urls, extract=EXTRACT)
    await start_executor(worker_settings, executors)
    row = await wait_terminal(db, job_id)

    assert row["status"] == "completed"
    assert (row["total"], row["succeeded"], row["failed"], row["queued"], row["running"]) == (
        200,
        200,
        0,
        0,
        0,
    )
    pages = await pages_of(db, job_id)
    assert len(pages) == 200
    assert len({p["url"] for p in pages}) == 200
    by_url = {p["url"]: p for p in pages}
    for n in range(200):
        page = by_url[site.url(f"/page/{n}")]
        assert page["ok"] is True and page["status_code"] == 200
        assert page["data"] == {"title": f"Product {n}", "price": f"{n}.99"}
    assert all(site.hits[f"/page/{n}"] == 1 for n in range(200))
    assert await task_counts(db, job_id) == {"succeeded": 200}
    async with db.connect() as conn:
        statuses = [
            r[0]
            for r in await conn.execute(
                text("SELECT status FROM job_events WHERE job_id = :j ORDER BY id"), {"j": job_id}
            )
        ]
    assert statuses == ["running", "completed"]
    assert row["started_at"] is not None and row["finished_at"] >= row["started_at"]


async def test_error_kinds_retries_and_content(
    db: ConnectionManager, site: LocalSite, worker_settings: Settings, executors: list
) -> None:
    paths = [
        "/missing",
        "/flaky/a",
        "/limited/a",
        "/slow",
        "/reset",
        "/redirect/3",
        "/big",
        "/binary",
        "/legacy",
    ]
    job_id = await create_job(
        db,
        [site.url(p) for p in paths],
        extract={"title": {"css": "h1", "value": "text"}},
        max_attempts=3,
        options={"timeout_s": 1},
    )
    started = time.monotonic()
    await start_executor(worker_settings, executors)
    row = await wait_terminal(db, job_id, timeout=40)
    assert row["status"] == "completed"
    pages = {p["url"].removeprefix(site.base): p for p in await pages_of(db, job_id)}
    assert set(pages) == set(paths)

    assert pages["/missing"]["status_code"] == 404 and not pages["/missing"]["ok"]
    assert site.hits["/missing"] == 1, "a 404 is final, never retried"

    assert pages["/flaky/a"]["ok"] and site.hits["/flaky/a"] == 3
    assert pages["/flaky/a"]["data"] == {"title": "finally"}

    assert pages["/limited/a"]["ok"] and site.hits["/limited/a"] == 2
    assert time.monotonic() - started >= 1.0, "Retry-After: 1 was honoured"

    assert not pages["/slow"]["ok"] and "timed out" in pages["/slow"]["error"].lower()
    assert site.hits["/slow"] == 3, "timeouts are retried up to max_attempts"

    assert not pages["/reset"]["ok"] and site.hits["/reset"] == 3

    assert pages["/redirect/3"]["ok"]
    assert pages["/redirect/3"]["final_url"] == site.url("/redirect/0")
    assert pages["/redirect/3"]["data"] == {"title": "landed"}

    assert not pages["/big"]["ok"] and site.hits["/big"] == 1
    assert "exceeds" in pages["/big"]["error"].lower()

    assert pages["/binary"]["ok"] and pages["/binary"]["content_type"] == "image/png"
    assert pages["/binary"]["data"] == {}

    assert pages["/legacy"]["data"] == {"title": "Привет, мир"}

    counts = await task_counts(db, job_id)
    assert counts == {"succeeded": 5, "failed": 4}
    assert (row["succeeded"], row["failed"], row["total"]) == (5, 4, 9)


async def test_two_executors_never_fetch_the_same_task(
    db: ConnectionManager, site: LocalSite, worker_settings: Settings, executors: list
) -> None:
    site.delay = 0.01
    urls = [site.url(f"/page/{n}") for n in range(400)]
    job_id = await create_job(db, urls)
    a = await start_executor(worker_settings, executors)
    b = await start_executor(worker_settings, executors)
    row = await wait_terminal(db, job_id)
    assert row["status"] == "completed" and row["succeeded"] == 400
    assert sum(site.hits.values()) == 400
    assert max(site.hits.values()) == 1
    assert a.stats.claimed > 0 and b.stats.claimed > 0, "both workers took part"
    assert a.stats.claimed + b.stats.claimed == 400


async def test_a_claim_that_found_the_host_locked_is_retried_soon(
    db: ConnectionManager, site: LocalSite, db_url: str, executors: list
) -> None:
    """Another worker's claim holds the host's row (claims skip locked hosts): the empty
    claim is retried within a fraction of a second, not after the poll interval."""
    settings = make_settings(db_url, poll_interval=5.0, worker_concurrency=4)
    job_id = await create_job(db, [site.url(f"/page/{n}") for n in range(8)])
    host = site.url("/").split("/")[2]
    async with db.engine.connect() as holder:
        await holder.execute(
            text("SELECT 1 FROM hosts WHERE host = :h FOR UPDATE"), {"h": host}
        )  # (the transaction autobegun here holds the lock until the commit below)
        worker = await start_executor(settings, executors)
        for _ in range(200):
            if worker.stats.claim_batches:
                break
            await asyncio.sleep(0.01)
        assert worker.stats.claim_batches >= 1 and worker.stats.claimed == 0
        await holder.commit()
        released = time.monotonic()
    while worker.stats.claimed == 0:
        assert time.monotonic() - released < 2.0, "the worker waited for its poll interval"
        await asyncio.sleep(0.01)
    row = await wait_terminal(db, job_id)
    assert row["status"] == "completed" and row["succeeded"] == 8


async def test_a_worker_whose_writer_is_stuck_stops_leasing(
    db: ConnectionManager, site: LocalSite, db_url: str, executors: list
) -> None:
    """Finished tasks keep their leases until the writer stores their outcomes: while it
    cannot (here the pages table is locked), the worker leases at most its bound, not the
    whole queue; once it can, everything is stored."""
    from app.utils.executor import MAX_UNSTORED_CHUNKS

    settings = make_settings(db_url, worker_concurrency=16, claim_batch=10)
    job_id = await create_job(db, [site.url(f"/page/{n}") for n in range(600)])
    bound = MAX_UNSTORED_CHUNKS * 10 * 5 + 2 * 16 + 10  # unstored + running + one claim
    async with db.engine.connect() as holder:
        await holder.execute(text("LOCK TABLE pages IN SHARE MODE"))  # no INSERT gets by
        worker = await start_executor(settings, executors)
        for _ in range(300):
            if worker.unstored >= MAX_UNSTORED_CHUNKS * 50:
                break
            await asyncio.sleep(0.01)
        assert worker.unstored >= MAX_UNSTORED_CHUNKS * 50, "the writer fell behind"
        await asyncio.sleep(1.0)  # (the site answers 600 pages in well under a second)
        counts = await task_counts(db, job_id)
        assert counts.get("leased", 0) <= bound and counts.get("queued", 0) >= 600 - bound
        await holder.commit()
    row = await wait_terminal(db, job_id)
    assert row["status"] == "completed" and row["succeeded"] == 600
    assert sum(site.hits.values()) == 600


async def test_killed_executor_leases_are_finished_by_another(
    db: ConnectionManager, site: LocalSite, worker_settings: Settings, executors: list
) -> None:
    site.delay = 30  # the first worker hangs on every page
    urls = [site.url(f"/page/{n}") for n in range(20)]
    job_id = await create_job(db, urls, options={"timeout_s": 60})
    victim = await start_executor(worker_settings, executors)
    for _ in range(100):
        if victim.outstanding == 20:
            break
        await asyncio.sleep(0.05)
    assert victim.outstanding == 20
    executors.remove(victim)
    await crash(victim)
    assert (await task_counts(db, job_id)) == {"leased": 20}

    site.delay = 0
    survivor = await start_executor(worker_settings, executors)
    row = await wait_terminal(db, job_id, timeout=30)
    assert row["status"] == "completed" and row["succeeded"] == 20
    pages = await pages_of(db, job_id)
    assert len(pages) == 20 and len({p["task_id"] for p in pages}) == 20
    assert survivor.stats.recovered >= 20 or survivor.stats.claimed == 20
    assert (await task_counts(db, job_id)) == {"succeeded": 20}


async def test_graceful_stop_returns_unfinished_leases(
    db: ConnectionManager, site: LocalSite, worker_settings: Settings, executors: list
) -> None:
    site.delay = 30
    urls = [site.url(f"/page/{n}") for n in range(10)]
    job_id = await create_job(db, urls, options={"timeout_s": 60})
    ex = await start_executor(worker_settings, executors)
    for _ in range(100):
        if ex.outstanding == 10:
            break
        await asyncio.sleep(0.05)
    executors.remove(ex)
    t0 = time.monotonic()
    await ex.stop(grace=0.5)
    assert time.monotonic() - t0 < 5
    await ex.db.dispose()
    assert await task_counts(db, job_id) == {"queued": 10}
    row = await job_row(db, job_id)
    assert (row["queued"], row["running"]) == (10, 0)
    async with db.connect() as conn:
        attempts = (await conn.execute(text("SELECT max(attempts) FROM tasks"))).scalar()
        state = (
            await conn.execute(text("SELECT state FROM workers WHERE id = :i"), {"i": ex.worker_id})
        ).scalar()
    assert attempts == 0, "a returned lease does not use up an attempt"
    assert state == "stopped"


async def test_pause_stops_claims_and_resume_restarts(
    db: ConnectionManager, site: LocalSite, worker_settings: Settings, executors: list
) -> None:
    async with db.connect() as conn:
        await conn.execute(text("UPDATE cluster_state SET paused = true"))
    job_id = await create_job(db, [site.url(f"/page/{n}") for n in range(5)])
    await start_executor(worker_settings, executors)
    await asyncio.sleep(1.0)
    assert await task_counts(db, job_id) == {"queued": 5}
    async with db.connect() as conn:
        await conn.execute(text("UPDATE cluster_state SET paused = false"))
        await conn.execute(text("SELECT pg_notify('trawler_tasks', '')"))
    row = await wait_terminal(db, job_id, timeout=10)
    assert row["status"] == "completed"


async def test_cancel_stops_fetching_within_two_seconds(
    db: ConnectionManager, site: LocalSite, worker_settings: Settings, executors: list
) -> None:
    from app.services.jobs import cancel_job

    site.delay = 10  # every fetch hangs until cancelled
    urls = [site.url(f"/page/{n}") for n in range(100)]
    job_id = await create_job(db, urls, tenant="t1", options={"timeout_s": 60}, host_limit=8)
    ex = await start_executor(worker_settings, executors)
    for _ in range(100):
        if site.active == 8:
            break
        await asyncio.sleep(0.05)
    assert site.active == 8, "eight fetches in flight before the cancel"
    async with db.session() as session:
        job = await cancel_job(session, "t1", job_id)
    assert job.status == "cancelled"
    cancelled_at = time.monotonic()
    while ex.outstanding and time.monotonic() - cancelled_at < 5:
        await asyncio.sleep(0.05)
    stopped_after = time.monotonic() - cancelled_at
    assert ex.outstanding == 0
    assert stopped_after < 2.0, f"in-flight work ran {stopped_after:.2f}s after the cancel"
    requested = sum(site.hits.values())
    await asyncio.sleep(1.0)
    assert sum(site.hits.values()) == requested, "nothing fetched after the cancel"
    assert await task_counts(db, job_id) == {"cancelled": 100}
    assert await pages_of(db, job_id) == []
