"""`trawler worker` as real processes: SIGTERM drains and returns leases; SIGKILL loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

from app.database.connection import ConnectionManager
from tests.support.jobs import create_job, job_row, pages_of, task_counts
from tests.support.site import LocalSite
from tests.support.workers import wait_until, worker_process


async def leased(db: ConnectionManager, job_id: uuid.UUID) -> int:
    return (await task_counts(db, job_id)).get("leased", 0)


async def test_sigterm_drains_and_returns_leases(db_url: str, db: ConnectionManager) -> None:
    async with LocalSite().serve() as site:
        site.delay = 30  # fetches hang: the grace period must end them
        job_id = await create_job(
            db, [site.url(f"/page/{n}") for n in range(10)], options={"timeout_s": 60}
        )
        async with worker_process(db_url, TRAWLER_SHUTDOWN_GRACE="1") as worker:
            await wait_until(lambda: _equals(leased(db, job_id), 10), 30, "10 leased")
            started = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(worker.wait(), 15)
            took = time.monotonic() - started
        assert code == 0
        assert took < 8, f"drain took {took:.1f}s with a 1 s grace period"
        assert await task_counts(db, job_id) == {"queued": 10}
        row = await job_row(db, job_id)
        assert (row["queued"], row["running"]) == (10, 0)


async def test_sigkill_loses_nothing(db_url: str, db: ConnectionManager) -> None:
    async with LocalSite().serve() as site:
        site.delay = 30
        job_id = await create_job(
            db, [site.url(f"/page/{n}") for n in range(20)], options={"timeout_s": 60}
        )
        async with worker_process(db_url) as victim:
            await wait_until(lambda: _equals(leased(db, job_id), 20), 30, "20 leased")
            victim.kill()  # SIGKILL: no drain, no release, no deregistration
            await victim.wait()
        site.delay = 0
        async with worker_process(db_url) as survivor:
            await wait_until(lambda: _terminal(db, job_id), 40, "job terminal")
            survivor.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(survivor.wait(), 15) == 0
    row = await job_row(db, job_id)
    assert row["status"] == "completed"
    assert row["succeeded"] == 20
    pages = await pages_of(db, job_id)
    assert len(pages) == 20
    assert len({p["task_id"] for p in pages}) == 20, "each result stored once"


async def _equals(value_coro, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return bool(await value_coro == expected)


async def _terminal(db: ConnectionManager, job_id: uuid.UUID) -> bool:
    return (await job_row(db, job_id))["status"] in ("completed", "failed", "cancelled")
