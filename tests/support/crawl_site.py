"""A generated local site for crawl tests: categories, items, duplicates, a trap, robots."""

from __future__ import annotations

import asyncio
import gzip
from collections import Counter

from aiohttp import web

from tests.support.served import ServedSite


class CrawlSite(ServedSite):
    """/ -> /cat/0..C-1 -> /item/<c>-<0..I-1>; plus /private (robots), /calendar (a trap),
    equivalent URL spellings of the same pages, and /orphan reachable only by sitemap."""

    def __init__(
        self,
        *,
        categories: int = 3,
        items: int = 5,
        robots: str = "User-agent: *\nDisallow: /private\n",
        delay: float = 0.0,
        sitemap: bool = False,
    ) -> None:
        self.categories = categories
        self.items = items
        self.robots = robots
        self.delay = delay
        self.sitemap = sitemap
        self.hits: Counter[str] = Counter()
        self.agents: Counter[str] = Counter()  # page requests by User-Agent (which worker)
        self.starts: list[tuple[float, str]] = []
        self.active = 0
        self.max_active = 0
        # paths being answered right now (a fetch in flight, as the server sees it)
        self.in_flight: Counter[str] = Counter()
        super().__init__()
        self.app.router.add_get("/robots.txt", self.robots_txt)
        self.app.router.add_get("/sitemap.xml", self.sitemap_xml)
        self.app.router.add_get("/sitemap-items.xml.gz", self.sitemap_gz)
        self.app.router.add_get("/{tail:.*}", self.page)

    def expected_pages(self, max_depth: int) -> set[str]:
        pages = {"/"}
        if max_depth >= 1:
            pages |= {f"/cat/{c}" for c in range(self.categories)} | {"/calendar/2024/1"}
        if max_depth >= 2:
            pages |= {f"/item/{c}-{i}" for c in range(self.categories) for i in range(self.items)}
            pages.add("/calendar/2024/2")
        for depth in range(3, max_depth + 1):
            pages.add(f"/calendar/2024/{depth}")
        return {self.url(p) for p in pages}

    async def robots_txt(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        body = self.robots
        if self.sitemap:
            body += f"\nSitemap: {self.url('/sitemap.xml')}\n"
        return web.Response(text=body)

    async def sitemap_xml(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        body = (
            '<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/'
            f'sitemap/0.9"><sitemap><loc>{self.url("/sitemap-items.xml.gz")}</loc>'
            "</sitemap></sitemapindex>"
        )
        return web.Response(text=body, content_type="application/xml")

    async def sitemap_gz(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        urls = "".join(f"<url><loc>{self.url(p)}</loc></url>" for p in ("/orphan", "/cat/0"))
        xml = (
            '<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
            f"{urls}</urlset>"
        )
        return web.Response(
            body=gzip.compress(xml.encode()), content_type="application/octet-stream"
        )

    async def page(self, request: web.Request) -> web.Response:
        path = request.path
        self.hits[path] += 1
        self.agents[request.headers.get("User-Agent", "")] += 1
        self.starts.append((asyncio.get_running_loop().time(), path))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.in_flight[path] += 1
        try:
            if self.delay:
                await self._sleep(self.delay)
            return web.Response(text=self._html(path), content_type="text/html")
        finally:
            self.active -= 1
            self.in_flight[path] -= 1
            if not self.in_flight[path]:
                del self.in_flight[path]

    def _html(self, path: str) -> str:
        links: list[str] = []
        port = self.base.rsplit(":", 1)[1]
        if path == "/":
            links = [f"/cat/{c}" for c in range(self.categories)]
            # the same pages spelled differently: fragment, default-port-less host case,
            # dot segments, percent-encoded unreserved characters
            links += ["/cat/0#top", f"HTTP://127.0.0.1:{port}/cat/1", "/x/../cat/2", "/%63at/0"]
            links += ["/private/secret", "/calendar/2024/1", "mailto:a@b.c", "javascript:void(0)"]
            links += ["https://elsewhere.example/page"]
        elif path.startswith("/cat/"):
            c = path.rsplit("/", 1)[1]
            links = [f"/item/{c}-{i}" for i in range(self.items)] + ["/", f"/cat/{c}"]
        elif path.startswith("/calendar/"):
            year, month = path.split("/")[2:4]
            links = [f"/calendar/{year}/{int(month) + 1}"]
        title = path.strip("/") or "home"
        anchors = "".join(f'<a href="{href}">{href}</a>' for href in links)
        return (
            f"<html><head><title>{title}</title></head><body><h1>{title}</h1>"
            f"{anchors}</body></html>"
        )
