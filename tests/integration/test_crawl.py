"""Crawl jobs end to end: the frontier in PostgreSQL shared by several executors."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.database.connection import ConnectionManager
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.support.crawl_site import CrawlSite
from tests.support.executors import start_executor
from tests.support.jobs import job_row, pages_of


@pytest.fixture
def worker_settings(db_url: str) -> Settings:
    return make_settings(db_url, retry_base_s=0.05, worker_stale_seconds=3.0, worker_concurrency=16)


async def start_executors(
    settings: Settings, started: list[AsyncJobExecutor], n: int = 1
) -> list[AsyncJobExecutor]:
    return [await start_executor(settings, started) for _ in range(n)]


async def submit_crawl(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> uuid.UUID:
    response = await client.post("/api/v1/crawl", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return uuid.UUID(response.json()["id"])


async def wait_done(db: ConnectionManager, job_id: uuid.UUID, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    row: dict = {}
    while time.monotonic() < deadline:
        row = await job_row(db, job_id)
        if row["status"] in ("completed", "failed", "cancelled"):
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"crawl not finished after {timeout}s: {row}")


async def task_states(db: ConnectionManager, job_id: uuid.UUID) -> dict[str, str]:
    async with db.connect() as conn:
        rows = await conn.execute(
            text("SELECT url, status FROM tasks WHERE job_id = :j"), {"j": job_id}
        )
        return {r[0]: r[1] for r in rows}


async def test_crawl_reaches_exactly_the_expected_pages(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    db: ConnectionManager,
    worker_settings: Settings,
    executors: list,
) -> None:
    async with CrawlSite().serve() as site:
        job_id = await submit_crawl(
            client,
            auth_headers,
            {
                "seeds": [site.url("/")],
                "extract": {"title": {"css": "h1"}},
                "follow": {"max_depth": 2, "max_pages": 1000},
            },
        )
        await start_executors(worker_settings, executors)
        row = await wait_done(db, job_id)

    assert row["status"] == "completed"
    pages = await pages_of(db, job_id)
    stored = {p["url"] for p in pages}
    assert stored == site.expected_pages(2)
    assert len(pages) == len(stored), "each page stored once"
    # equivalent spellings were fetched once: every page path was requested exactly once
    page_hits = {path: n for path, n in site.hits.items() if path != "/robots.txt"}
    assert all(n == 1 for n in page_hits.values()), page_hits
    assert site.hits["/robots.txt"] == 1
    assert "/private/secret" not in site.hits, "robots.txt disallow honoured"
    states = await task_states(db, job_id)
    assert states[site.url("/private/secret")] == "skipped"
    assert not any("elsewhere.example" in u for u in states), "external links not followed"
    assert row["skipped"] == 1
    assert row["succeeded"] == len(stored)
    assert row["total"] == len(stored) + 1
    titles = {p["url"]: p["data"]["title"] for p in pages}
    assert titles[site.url("/cat/1")] == "cat/1"


async def test_max_pages_is_exact_with_three_executors(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    db: ConnectionManager,
    worker_settings: Settings,
    executors: list,
) -> None:
    async with CrawlSite(categories=10, items=20, robots="").serve() as site:
        job_id = await submit_crawl(
            client,
            auth_headers,
            {
                "seeds": [site.url("/")],
                "follow": {"max_depth": 5, "max_pages": 37},
                "politeness": {"per_host_concurrency": 8},
            },
        )
        await start_executors(worker_settings, executors, n=3)
        row = await wait_done(db, job_id)
    assert row["status"] == "completed"
    pages = await pages_of(db, job_id)
    assert len(pages) == 37
    assert row["total"] == 37
    assert sum(n for p, n in site.hits.items() if p != "/robots.txt") == 37


async def test_per_host_concurrency_holds_in_a_worker(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    db: ConnectionManager,
    worker_settings: Settings,
    executors: list,
) -> None:
    async with CrawlSite(categories=6, items=10, robots="", delay=0.05).serve() as site:
        job_id = await submit_crawl(
            client,
            auth_headers,
            {
                "seeds": [site.url("/")],
                "follow": {"max_depth": 2},
                "politeness": {"per_host_concurrency": 3},
            },
        )
        # one worker here; tests/e2e/test_crawl_cluster.py checks it across processes
        await start_executors(worker_settings, executors, n=1)
        row = await wait_done(db, job_id)
    assert row["status"] == "completed"
    assert site.max_active <= 3
    assert site.max_active >= 2, "the limit was actually exercised"


async def test_crawl_delay_from_robots_spaces_fetches(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    db: ConnectionManager,
    worker_settings: Settings,
    executors: list,
) -> None:
    robots = "User-agent: *\nCrawl-delay: 0.3\nDisallow: /private\n"
    async with CrawlSite(categories=4, items=0, robots=robots).serve() as site:
        job_id = await submit_crawl(
            client,
            auth_headers,
            {"seeds": [site.url("/")], "follow": {"max_depth": 1}},
        )
        await start_executors(worker_settings, executors, n=1)
        row = await wait_done(db, job_id)
    assert row["status"] == "completed"
    starts = sorted(t for t, _ in site.starts)
    assert len(starts) == 6  # /, 4 categories, /calendar/2024/1
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.28, gaps


async def test_sitemap_discovery(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    db: ConnectionManager,
    worker_settings: Settings,
    executors: list,
) -> None:
    async with CrawlSite(categories=2, items=1, sitemap=True).serve() as site:
        job_id = await submit_crawl(
            client,
            auth_headers,
            {"seeds": [site.url("/")], "follow": {"max_depth": 1, "sitemaps": True}},
        )
        await start_executors(worker_settings, executors)
        row = await wait_done(db, job_id)
    assert row["status"] == "completed"
    stored = {p["url"] for p in await pages_of(db, job_id)}
    assert site.url("/orphan") in stored, "found only through the gzipped sitemap"
    assert site.hits["/sitemap.xml"] == 1
    assert site.hits["/sitemap-items.xml.gz"] == 1
