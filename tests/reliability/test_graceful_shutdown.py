"""Scenario 3: SIGTERM to a `trawler worker` in the middle of a crawl.

Promise: in-flight fetches finish within the grace period and are stored, unfinished leases
go back to the queue, another worker continues, nothing is fetched twice (the test site
counts requests per URL).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from app.database.connection import ConnectionManager
from tests.integration.conftest import Headers
from tests.support.crawl_site import CrawlSite
from tests.support.jobs import pages_of, pages_stored_twice, scalar, task_counts, wait_terminal
from tests.support.workers import wait_until, worker_id, worker_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@dataclass
class Shutdown:
    in_flight: set[str]  # paths being fetched when SIGTERM was sent
    held: int  # tasks leased by the worker at SIGTERM
    took: float  # SIGTERM -> exit
    started_after: list[str]  # fetches the worker began after SIGTERM
    unfinished: list[str]  # in-flight paths with no stored page when the worker was gone
    leased_after: int
    queued_after: int


async def _leased_by(db: ConnectionManager, job_id: uuid.UUID, worker: uuid.UUID) -> int:
    return int(
        await scalar(
            db,
            "SELECT count(*) FROM task_queue WHERE job_id = :j AND lease_owner = :w",
            j=job_id,
            w=worker,
        )
    )


async def _sigterm_mid_crawl(
    db_url: str,
    db: ConnectionManager,
    client: httpx.AsyncClient,
    headers: Headers,
    site: CrawlSite,
    *,
    concurrency: int,
    grace: float,
) -> tuple[uuid.UUID, Shutdown]:
    """Crawl with one worker, SIGTERM it while every slot is fetching and more is leased."""
    response = await client.post(
        "/api/v1/crawl",
        headers=headers,
        json={
            "seeds": [site.url("/")],
            "follow": {"max_depth": 2, "max_pages": 1000},
            "politeness": {"per_host_concurrency": 64},
        },
    )
    assert response.status_code == 202, response.text
    job_id = uuid.UUID(response.json()["id"])
    env = {
        "TRAWLER_WORKER_CONCURRENCY": str(concurrency),
        "TRAWLER_SHUTDOWN_GRACE": str(grace),
    }
    async with worker_process(db_url, **env) as first:
        first_id = await worker_id(db, first.pid)

        async def busy() -> bool:
            # every slot fetching, and more leased than fetching (the crawl is under way)
            return site.active == concurrency and (
                await _leased_by(db, job_id, first_id) > concurrency
            )

        await wait_until(busy, 60, "the worker busy mid-crawl", interval=0.02)
        loop = asyncio.get_running_loop()
        in_flight = set(site.in_flight)
        first.send_signal(signal.SIGTERM)
        signalled = loop.time()
        held = await _leased_by(db, job_id, first_id)
        code = await asyncio.wait_for(first.wait(), grace + 15)
        took = loop.time() - signalled
        assert code == 0, first.log()
    stored = {p["url"] for p in await pages_of(db, job_id)}
    counts = await task_counts(db, job_id)
    return job_id, Shutdown(
        in_flight=in_flight,
        held=held,
        took=took,
        started_after=[path for at, path in site.starts if at > signalled],
        unfinished=sorted(p for p in in_flight if site.url(p) not in stored),
        leased_after=counts.get("leased", 0),
        queued_after=counts.get("queued", 0),
    )


async def _finish_with_another_worker(
    db_url: str, db: ConnectionManager, job_id: uuid.UUID, site: CrawlSite
) -> float:
    started = time.monotonic()
    async with worker_process(db_url, TRAWLER_WORKER_CONCURRENCY="16") as second:
        row = await wait_terminal(db, job_id, timeout=60)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 30) == 0, second.log()
    assert row["status"] == "completed", row
    expected = site.expected_pages(2)
    pages = await pages_of(db, job_id)
    assert {p["url"] for p in pages} == expected
    assert await pages_stored_twice(db, job_id) == {}
    assert len(pages) == len(expected)
    counts = await task_counts(db, job_id)
    assert counts == {"succeeded": len(expected), "skipped": 1}, counts
    return time.monotonic() - started


async def test_sigterm_mid_crawl_finishes_in_flight_fetches_and_hands_over(
    db_url: str, db: ConnectionManager, client: httpx.AsyncClient, headers: Headers
) -> None:
    """Grace longer than a fetch: what is in flight finishes and is stored, the worker exits
    well within the grace, nothing stays leased, another worker completes the crawl, and no
    URL is fetched twice."""
    concurrency, grace, fetch_s = 4, 5.0, 0.4
    async with CrawlSite(categories=4, items=12, delay=fetch_s).serve() as site:
        job_id, down = await _sigterm_mid_crawl(
            db_url, db, client, headers, site, concurrency=concurrency, grace=grace
        )
        assert len(down.in_flight) == concurrency
        assert down.unfinished == [], f"in-flight fetches not stored: {down.unfinished}"
        assert down.took < grace, f"exit took {down.took:.1f}s with a {grace:g}s grace"
        assert down.leased_after == 0, "leases left behind"
        assert down.queued_after > 0, "nothing left for the other worker: nothing tested"
        rest_s = await _finish_with_another_worker(db_url, db, job_id, site)
    page_hits = {path: n for path, n in site.hits.items() if path != "/robots.txt"}
    twice = sorted(path for path, n in page_hits.items() if n > 1)
    assert twice == [], f"fetched twice: {twice}"
    print(
        f"\n[SIGTERM] {down.held} leased, {len(down.in_flight)} fetching at SIGTERM; exit "
        f"{down.took:.2f}s later (grace {grace:g}s), in-flight stored, 0 left leased, "
        f"{down.queued_after} queued handed over; second worker finished in {rest_s:.1f}s; "
        f"fetched twice: 0; fetches started after SIGTERM: {len(down.started_after)}"
    )


async def test_sigterm_returns_unstarted_leases_at_once(
    db_url: str, db: ConnectionManager, client: httpx.AsyncClient, headers: Headers
) -> None:
    """Grace shorter than two fetches: the worker must not start leased-but-waiting tasks
    after SIGTERM, so it exits after one fetch time and nothing is fetched twice."""
    concurrency, grace, fetch_s = 4, 1.6, 1.0
    async with CrawlSite(categories=4, items=8, delay=fetch_s).serve() as site:
        job_id, down = await _sigterm_mid_crawl(
            db_url, db, client, headers, site, concurrency=concurrency, grace=grace
        )
        assert down.unfinished == [], f"in-flight fetches not stored: {down.unfinished}"
        assert down.leased_after == 0, "leases left behind"
        await _finish_with_another_worker(db_url, db, job_id, site)
    page_hits = {path: n for path, n in site.hits.items() if path != "/robots.txt"}
    twice = sorted(path for path, n in page_hits.items() if n > 1)
    print(
        f"\n[SIGTERM, short grace] {down.held} leased, {len(down.in_flight)} fetching; "
        f"exit after {down.took:.2f}s; started after SIGTERM: {down.started_after}; "
        f"fetched twice: {twice}"
    )
    assert down.started_after == [], f"fetches started after SIGTERM: {down.started_after}"
    assert twice == [], f"fetched twice: {twice}"
