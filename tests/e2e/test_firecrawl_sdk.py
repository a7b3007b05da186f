"""The real, unmodified firecrawl-py SDK against a running Trawler (uvicorn on 127.0.0.1,
the executor inside it as in `trawler serve`) and local sites: crawl, page through the
results, scrape to Markdown, batch scrape, map, cancel; Firecrawl, AsyncFirecrawl and v1.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import uvicorn
from firecrawl import AsyncFirecrawl, Firecrawl, V1FirecrawlApp
from firecrawl.v2.types import PaginationConfig, ScrapeOptions

from app.database.connection import ConnectionManager
from app.main import create_app
from app.utils.runner import executor_hook
from tests.conftest import make_settings
from tests.integration.conftest import make_key
from tests.support.crawl_site import CrawlSite

pytestmark = pytest.mark.timeout(90)

T = TypeVar("T")


@dataclass
class Trawler:
    url: str
    key: str


@pytest.fixture
async def trawler(db_url: str, db: ConnectionManager) -> AsyncIterator[Trawler]:
    """`trawler serve` in this process: the app with its executor under uvicorn."""
    settings = make_settings(db_url, retry_base_s=0.05, worker_concurrency=16, shutdown_grace=1.0)
    app = create_app(settings, migrate=False, hooks=[executor_hook(settings)])
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert not task.done(), "uvicorn stopped during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.02)
        yield Trawler(f"http://127.0.0.1:{port}", await make_key(db, "sdk"))
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


async def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """The synchronous SDK blocks (requests, time.sleep): off the loop serving it."""
    return await asyncio.to_thread(call, *args, **kwargs)


def _paths(urls: list[str]) -> set[str]:
    return {urlsplit(url).path for url in urls}


async def test_sdk_crawls_pages_scrapes_batches_maps_and_cancels(trawler: Trawler) -> None:
    app = Firecrawl(api_key=trawler.key, api_url=trawler.url)
    # 120 pages: more than one status page (100 documents), so the SDK follows `next`
    async with CrawlSite(categories=10, items=12, sitemap=True).serve() as site:
        job = await in_thread(
            app.crawl,
            site.url("/"),
            limit=120,
            scrape_options=ScrapeOptions(formats=["markdown", "links"]),
            poll_interval=1,
            timeout=60,
        )
        assert job.status == "completed"
        assert job.total == 120
        assert job.completed == job.credits_used == len(job.data) > 100
        assert job.expires_at is not None
        sources = [doc.metadata.source_url for doc in job.data if doc.metadata]
        assert len(sources) == len(set(sources)) == len(job.data)
        cat = next(doc for doc in job.data if doc.metadata and doc.metadata.title == "cat/1")
        assert cat.markdown is not None and cat.markdown.startswith("# cat/1")
        assert cat.links is not None and site.url("/item/1-0") in cat.links
        assert cat.metadata is not None and cat.metadata.status_code == 200

        # the same results a page at a time: the first page and its absolute next URL
        crawl_id = await in_thread(app.start_crawl, site.url("/"), limit=120, sitemap="skip")
        crawl_id_str = crawl_id.id
        first = await in_thread(
            app.get_crawl_status,
            crawl_id_str,
            pagination_config=PaginationConfig(auto_paginate=False),
        )
        deadline = time.monotonic() + 30
        while first.status != "completed":
            assert time.monotonic() < deadline, first.status
            await asyncio.sleep(0.2)
            first = await in_thread(
                app.get_crawl_status,
                crawl_id_str,
                pagination_config=PaginationConfig(auto_paginate=False),
            )
        assert len(first.data) == 100
        assert first.next == f"{trawler.url}/v2/crawl/{crawl_id_str}?skip=100"
        rest = await in_thread(app.get_crawl_status_page, first.next)
        assert rest.next is None
        assert len(first.data) + len(rest.data) == first.completed
        errors = await in_thread(app.get_crawl_errors, crawl_id_str)
        assert errors.robots_blocked == [site.url("/private/secret")]

        # scrape one page to Markdown
        doc = await in_thread(app.scrape, site.url("/cat/3"), formats=["markdown", "html"])
        assert doc.markdown is not None and doc.markdown.startswith("# cat/3")
        assert f"[/item/3-0]({site.url('/item/3-0')})" in doc.markdown
        assert doc.html is not None and "<h1>cat/3</h1>" in doc.html
        assert doc.metadata is not None and doc.metadata.title == "cat/3"
        assert doc.metadata.source_url == site.url("/cat/3")

        # batch scrape
        urls = [site.url("/item/2-1"), site.url("/item/2-2"), site.url("/cat/2")]
        batch = await in_thread(app.batch_scrape, urls, formats=["markdown"], poll_interval=1)
        assert batch.status == "completed" and batch.completed == batch.total == 3
        heads = sorted((d.markdown or "").split("\n")[0] for d in batch.data)
        assert heads == ["# cat/2", "# item/2-1", "# item/2-2"]

        # map: the page's links and the sitemap's URLs
        mapped = await in_thread(app.map, site.url("/"))
        found = _paths([link.url for link in mapped.links])
        assert {"/", "/orphan", "/cat/0", "/cat/9"} <= found
        assert mapped.links[0].title == "home"

    # cancel a crawl of a slow site while it runs
    async with CrawlSite(delay=1.0).serve() as slow:
        started = await in_thread(app.start_crawl, slow.url("/"), limit=50)
        active = await in_thread(app.get_active_crawls)
        assert started.id in [crawl.id for crawl in active.crawls]
        assert await in_thread(app.cancel_crawl, started.id) is True
        status = await in_thread(app.get_crawl_status, started.id)
        assert status.status == "cancelled"
        active = await in_thread(app.get_active_crawls)
        assert started.id not in [crawl.id for crawl in active.crawls]
        # a finished crawl cannot be cancelled any more: the SDK reads the 409 as False
        assert await in_thread(app.cancel_crawl, crawl_id_str) is False


async def test_async_sdk(trawler: Trawler) -> None:
    app = AsyncFirecrawl(api_key=trawler.key, api_url=trawler.url)
    async with CrawlSite(categories=2, items=2).serve() as site:
        job = await app.crawl(url=site.url("/"), limit=5, poll_interval=1, timeout=60)
        assert job.status == "completed" and job.total == 5
        assert len(job.data) == job.completed
        assert all(doc.markdown for doc in job.data)
        doc = await app.scrape(site.url("/cat/1"), formats=["markdown", "rawHtml"])
        assert doc.markdown is not None and doc.markdown.startswith("# cat/1")
        assert doc.raw_html is not None and doc.raw_html.startswith("<html><head><title>cat/1")
        mapped = await app.map(site.url("/"), sitemap="skip", limit=3)
        assert len(mapped.links) == 3
    async with CrawlSite(delay=1.0).serve() as slow:
        started = await app.start_crawl(url=slow.url("/"), limit=20)
        assert await app.cancel_crawl(started.id) is True
        assert (await app.get_crawl_status(started.id)).status == "cancelled"


# the SDK's v1 client still calls pydantic's deprecated .dict()
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")
async def test_v1_client(trawler: Trawler) -> None:
    app = V1FirecrawlApp(api_key=trawler.key, api_url=trawler.url)
    async with CrawlSite(categories=2, items=2).serve() as site:
        started = await in_thread(app.async_crawl_url, site.url("/"), limit=4, max_depth=2)
        assert started.success is True and started.id is not None
        assert started.url == f"{trawler.url}/v1/crawl/{started.id}"
        deadline = time.monotonic() + 30
        status = await in_thread(app.check_crawl_status, started.id)
        while status.status != "completed":
            assert time.monotonic() < deadline, status.status
            await asyncio.sleep(0.2)
            status = await in_thread(app.check_crawl_status, started.id)
        assert status.total == 4 and status.completed == len(status.data) >= 3
        # v1 maxDepth counts path segments: none of /calendar/2024/1's three
        paths = _paths([d.metadata["sourceURL"] for d in status.data])
        assert "/" in paths and all(p.count("/") <= 2 for p in paths), paths
        scraped = await in_thread(app.scrape_url, site.url("/cat/0"), formats=["markdown"])
        assert scraped.markdown is not None and scraped.markdown.startswith("# cat/0")
        assert scraped.metadata["statusCode"] == 200
    async with CrawlSite(delay=1.0).serve() as slow:
        running = await in_thread(app.async_crawl_url, slow.url("/"), limit=20)
        assert running.id is not None
        cancelled = await in_thread(app.cancel_crawl, running.id)
        assert cancelled == {"success": True, "status": "cancelled"}
        status = await in_thread(app.check_crawl_status, running.id)
        assert status.status == "cancelled"
