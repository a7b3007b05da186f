"""One crawl shared by several `trawler worker` processes: politeness and max_pages hold
cluster-wide, not only inside one process."""

from __future__ import annotations

import itertools
import uuid
from contextlib import AsyncExitStack
from typing import Any

import httpx
from sqlalchemy import text

from app.database.connection import ConnectionManager
from tests.integration.conftest import bearer, make_key
from tests.integration.test_crawl import wait_done
from tests.support.crawl_site import CrawlSite
from tests.support.jobs import pages_of
from tests.support.workers import wait_until, worker_process


async def submit(
    client: httpx.AsyncClient, db: ConnectionManager, body: dict[str, Any]
) -> uuid.UUID:
    headers = bearer(await make_key(db, "crawler"))
    response = await client.post("/api/v1/crawl", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return uuid.UUID(response.json()["id"])


async def run_workers(
    stack: AsyncExitStack, db_url: str, n: int, concurrency: int = 16
) -> list[str]:
    """Start n worker processes, each with its own User-Agent so the site can tell them apart."""
    agents = [f"trawler-test-worker-{i}" for i in range(n)]
    for agent in agents:
        await stack.enter_async_context(
            worker_process(
                db_url, TRAWLER_USER_AGENT=agent, TRAWLER_WORKER_CONCURRENCY=str(concurrency)
            )
        )
    return agents


async def all_registered(db: ConnectionManager, n: int) -> None:
    """Wait until n workers are up, so that the crawl starts with all of them."""

    async def up() -> bool:
        async with db.connect() as conn:
            count = await conn.execute(text("SELECT count(*) FROM workers WHERE state = 'running'"))
            return int(count.scalar_one()) >= n

    await wait_until(up, 30, f"{n} workers running")


async def test_per_host_concurrency_holds_across_two_processes(
    db_url: str, db: ConnectionManager, client: httpx.AsyncClient
) -> None:
    async with (
        CrawlSite(categories=8, items=12, robots="", delay=0.05).serve() as site,
        AsyncExitStack() as stack,
    ):
        agents = await run_workers(stack, db_url, 2)
        await all_registered(db, 2)
        job_id = await submit(
            client,
            db,
            {
                "seeds": [site.url("/")],
                "follow": {"max_depth": 2},
                "politeness": {"per_host_concurrency": 3},
            },
        )
        row = await wait_done(db, job_id, timeout=90)
    assert row["status"] == "completed"
    stored = {p["url"] for p in await pages_of(db, job_id)}
    # no robots.txt rules here, so /private/secret is crawled too
    assert stored == site.expected_pages(2) | {site.url("/private/secret")}
    # both processes were claiming the whole time (registered before the submission); which
    # of them wins a freed slot is first come, so one may take all of a 3-slot host: the
    # three-process test below checks that the work is shared
    assert sum(site.agents[a] for a in agents) == len(stored)
    assert site.max_active <= 3, f"{site.max_active} fetches in flight at once"
    assert site.max_active == 3, "the limit was actually reached"


async def test_max_pages_is_exact_with_three_processes(
    db_url: str, db: ConnectionManager, client: httpx.AsyncClient
) -> None:
    async with (
        CrawlSite(categories=12, items=30, robots="", delay=0.02).serve() as site,
        AsyncExitStack() as stack,
    ):
        # each process leases at most 2 x 4 tasks, so none can hold the host's 16 alone
        agents = await run_workers(stack, db_url, 3, concurrency=4)
        await all_registered(db, 3)
        job_id = await submit(
            client,
            db,
            {
                "seeds": [site.url("/")],
                "follow": {"max_depth": 5, "max_pages": 101},
                "politeness": {"per_host_concurrency": 16},
            },
        )
        row = await wait_done(db, job_id, timeout=90)
    assert row["status"] == "completed"
    pages = await pages_of(db, job_id)
    assert len(pages) == 101 and len({p["url"] for p in pages}) == 101
    assert row["total"] == 101
    assert sum(n for p, n in site.hits.items() if p != "/robots.txt") == 101
    assert sum(1 for a in agents if site.agents[a]) >= 2, f"processes shared it: {site.agents}"


async def test_crawl_delay_holds_across_two_processes(
    db_url: str, db: ConnectionManager, client: httpx.AsyncClient
) -> None:
    robots = "User-agent: *\nCrawl-delay: 0.3\n"
    async with (
        CrawlSite(categories=5, items=0, robots=robots).serve() as site,
        AsyncExitStack() as stack,
    ):
        agents = await run_workers(stack, db_url, 2)
        await all_registered(db, 2)
        job_id = await submit(client, db, {"seeds": [site.url("/")], "follow": {"max_depth": 1}})
        row = await wait_done(db, job_id, timeout=90)
    assert row["status"] == "completed"
    starts = sorted(t for t, _ in site.starts)
    assert len(starts) == 8  # /, 5 categories, /calendar/2024/1, /private/secret
    assert all(site.agents[a] for a in agents), f"both processes fetched: {site.agents}"
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.28, gaps
