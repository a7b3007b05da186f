"""Scenario 1: three `trawler worker` processes share a crawl; one is SIGKILLed mid-crawl.

Promise: the crawl completes, every reachable page is stored exactly once, no task stays
leased. Fetches are at-least-once: only what the killed worker held may be fetched again.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import httpx
import pytest

from app.database.connection import ConnectionManager
from tests.integration.conftest import Headers
from tests.support.crawl_site import CrawlSite
from tests.support.jobs import pages_of, pages_stored_twice, scalar, task_counts, wait_terminal
from tests.support.workers import wait_until, worker_id, worker_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CATEGORIES, ITEMS = 25, 100  # 2,528 reachable pages at depth 2
MIN_HELD = 8  # leases the victim holds when it is killed
WORKER_ENV = {
    # a dead worker is presumed lost 4 s after its last heartbeat; live ones beat every 0.5 s,
    # far enough apart that a busy 2-core machine never makes a live worker look dead
    "TRAWLER_WORKER_STALE_SECONDS": "4",
    # the host allows 64 fetches cluster-wide and a worker leases up to 2 x concurrency: with
    # 8 each, three workers (48) never contend for the host's allowance, so the victim
    # always holds a share of the crawl when it is killed
    "TRAWLER_WORKER_CONCURRENCY": "8",
}


async def _stored(db: ConnectionManager, job_id: uuid.UUID) -> int:
    return int(await scalar(db, "SELECT count(*) FROM pages WHERE job_id = :j", j=job_id))


async def _stored_more_than(db: ConnectionManager, job_id: uuid.UUID, n: int) -> bool:
    return await _stored(db, job_id) > n


async def _leased_by(db: ConnectionManager, job_id: uuid.UUID, worker: uuid.UUID) -> int:
    return int(
        await scalar(
            db,
            "SELECT count(*) FROM task_queue WHERE job_id = :j AND lease_owner = :w",
            j=job_id,
            w=worker,
        )
    )


async def test_sigkill_one_of_three_workers_mid_crawl(
    db_url: str, db: ConnectionManager, client: httpx.AsyncClient, headers: Headers
) -> None:
    async with CrawlSite(categories=CATEGORIES, items=ITEMS).serve() as site:
        expected = site.expected_pages(2)
        response = await client.post(
            "/api/v1/crawl",
            headers=headers,
            json={
                "seeds": [site.url("/")],
                "extract": {"title": {"css": "h1"}},
                "follow": {"max_depth": 2, "max_pages": 10_000},
                "politeness": {"per_host_concurrency": 64},
                "max_attempts": 3,
            },
        )
        assert response.status_code == 202, response.text
        job_id = uuid.UUID(response.json()["id"])
        started = time.monotonic()
        async with (
            worker_process(db_url, **WORKER_ENV) as first,
            worker_process(db_url, **WORKER_ENV) as victim,
            worker_process(db_url, **WORKER_ENV) as third,
        ):
            victim_id = await worker_id(db, victim.pid)
            await wait_until(
                lambda: _stored_more_than(db, job_id, len(expected) // 3),
                60,
                "a third of the crawl stored",
                interval=0.05,
            )
            # freeze the victim, so that what it holds can be counted, then kill it
            held = 0
            for _ in range(200):
                victim.send_signal(signal.SIGSTOP)
                held = await _leased_by(db, job_id, victim_id)
                if held >= MIN_HELD:
                    break
                victim.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.02)
            stored_at_kill = await _stored(db, job_id)
            victim.kill()
            await victim.wait()
            killed_at = time.monotonic()
            assert held >= MIN_HELD, f"the victim held {held} leases when killed: too few"
            assert stored_at_kill < len(expected), "killed after the crawl: nothing tested"
            row = await wait_terminal(db, job_id, timeout=120)
            finished = time.monotonic()
            for survivor in (first, third):
                survivor.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(survivor.wait(), 30)
                assert code == 0, survivor.log()

    assert row["status"] == "completed", row
    pages = await pages_of(db, job_id)
    stored = {p["url"] for p in pages}
    assert stored == expected, (len(stored), len(expected))
    assert await pages_stored_twice(db, job_id) == {}
    assert len(pages) == len(expected), "every reachable page stored exactly once"
    assert len({p["task_id"] for p in pages}) == len(pages)
    assert all(p["ok"] for p in pages), [p["error"] for p in pages if not p["ok"]][:5]
    counts = await task_counts(db, job_id)
    assert "leased" not in counts and "queued" not in counts, counts
    assert counts == {"succeeded": len(expected), "skipped": 1}, counts  # /private: robots
    assert (row["queued"], row["running"], row["succeeded"]) == (0, 0, len(expected))
    # at-least-once fetching: only URLs the killed worker held may have been fetched twice
    page_hits = {path: n for path, n in site.hits.items() if path != "/robots.txt"}
    refetched = sum(1 for n in page_hits.values() if n > 1)
    assert all(n <= 2 for n in page_hits.values()), max(page_hits.values())
    assert refetched <= held, f"{refetched} pages fetched twice, the victim held {held}"
    print(
        f"\n[worker crash] {len(expected)} pages, killed 1 of 3 workers at {stored_at_kill} "
        f"stored holding {held} leases; completed {finished - killed_at:.1f}s after the kill, "
        f"{finished - started:.1f}s in all; stored twice: 0; fetched twice: {refetched}"
    )
