"""collect_sitemap_urls against a real local aiohttp server: index, gzip, dedupe, bounds."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from app.scraper.fetch import Fetcher
from app.scraper.sitemaps import collect_sitemap_urls
from app.scraper.ssrf import SSRFGuard
from tests.support.servers import Handler, LocalServer, serve

pytestmark = pytest.mark.timeout(20)

LOCAL_ONLY = SSRFGuard(allow_cidrs=["127.0.0.1/32"])


def urlset(urls: list[str]) -> bytes:
    body = "".join(f"<url><loc>{url}</loc></url>" for url in urls)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{body}</urlset>'
    ).encode()


def index(urls: list[str]) -> bytes:
    body = "".join(f"<sitemap><loc>{url}</loc></sitemap>" for url in urls)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{body}</sitemapindex>'
    ).encode()


def make_routes(server: dict[str, str]) -> dict[str, Handler]:
    """Handlers that build absolute URLs from the server's base once it is known."""

    def base() -> str:
        return server["base"]

    async def sitemap_index(_: web.Request) -> web.Response:
        return web.Response(
            body=index(
                [
                    f"{base()}/sitemap-products.xml.gz",
                    f"{base()}/sitemap-pages.xml",
                    f"{base()}/sitemap-missing.xml",
                    f"{base()}/sitemap.xml",  # loops back to the index: read once
                ]
            ),
            content_type="application/xml",
        )

    async def products_gz(_: web.Request) -> web.Response:
        # a .gz file served as a binary type, no Content-Encoding: the body stays gzip
        body = gzip.compress(urlset([f"{base()}/p/{i}" for i in range(1, 4)]))
        return web.Response(body=body, headers={"Content-Type": "application/x-gzip"})

    async def pages(_: web.Request) -> web.Response:
        body = urlset([f"{base()}/about", f"{base()}/p/2", f"{base()}/contact"])
        return web.Response(body=body, content_type="text/xml")

    async def missing(_: web.Request) -> web.Response:
        return web.Response(status=404, text="not found")

    async def big(_: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(urlset([f"{base()}/big/{i}" for i in range(2000)])),
            headers={"Content-Type": "application/octet-stream"},
        )

    async def deep_index(request: web.Request) -> web.Response:
        level = int(request.match_info["n"])
        return web.Response(
            body=index([f"{base()}/deep/{level + 1}.xml", f"{base()}/leaf/{level}.xml"]),
            content_type="application/xml",
        )

    async def leaf(request: web.Request) -> web.Response:
        return web.Response(
            body=urlset([f"{base()}/leafpage/{request.match_info['n']}"]),
            content_type="application/xml",
        )

    return {
        "/sitemap.xml": sitemap_index,
        "/sitemap-products.xml.gz": products_gz,
        "/sitemap-pages.xml": pages,
        "/sitemap-missing.xml": missing,
        "/big.xml.gz": big,
        "/deep/{n}.xml": deep_index,
        "/leaf/{n}.xml": leaf,
    }


@pytest.fixture
async def site() -> AsyncIterator[LocalServer]:
    holder: dict[str, str] = {}
    async with serve(make_routes(holder)) as server:
        holder["base"] = server.base
        yield server


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher(guard=LOCAL_ONLY, total_timeout=5.0) as f:
        yield f


async def test_index_with_gzipped_and_plain_sitemaps(site: LocalServer, fetcher: Fetcher) -> None:
    urls = await collect_sitemap_urls(fetcher, [site.url("/sitemap.xml")])
    assert urls == [
        site.url("/p/1"),
        site.url("/p/2"),
        site.url("/p/3"),
        site.url("/about"),
        site.url("/contact"),
    ]
    # breadth-first, each file once, the 404 skipped without failing the walk
    assert site.paths == [
        "/sitemap.xml",
        "/sitemap-products.xml.gz",
        "/sitemap-pages.xml",
        "/sitemap-missing.xml",
    ]


async def test_start_urls_deduplicated(site: LocalServer, fetcher: Fetcher) -> None:
    urls = await collect_sitemap_urls(
        fetcher,
        [
            site.url("/sitemap-pages.xml"),
            site.url("/sitemap-pages.xml#again"),
            site.base.upper() + "/sitemap-pages.xml",
        ],
    )
    assert urls == [site.url("/about"), site.url("/p/2"), site.url("/contact")]
    assert site.paths == ["/sitemap-pages.xml"]


async def test_max_urls_bound(site: LocalServer, fetcher: Fetcher) -> None:
    urls = await collect_sitemap_urls(fetcher, [site.url("/big.xml.gz")], max_urls=150)
    assert urls == [site.url(f"/big/{i}") for i in range(150)]
    everything = await collect_sitemap_urls(fetcher, [site.url("/big.xml.gz")])
    assert len(everything) == 2000


async def test_max_files_bound_on_an_endless_index_chain(
    site: LocalServer, fetcher: Fetcher
) -> None:
    urls = await collect_sitemap_urls(fetcher, [site.url("/deep/0.xml")], max_files=5)
    assert len(site.paths) == 5
    # breadth-first: index 0, then its children (deep/1, leaf/0), then theirs
    assert site.paths[:3] == ["/deep/0.xml", "/deep/1.xml", "/leaf/0.xml"]
    assert site.url("/leafpage/0") in urls


async def test_unreachable_start_url_gives_nothing(fetcher: Fetcher) -> None:
    assert await collect_sitemap_urls(fetcher, ["http://127.0.0.1:9/sitemap.xml"]) == []
