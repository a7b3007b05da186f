"""A real local HTTP site for executor tests: pages, errors, slow and hostile answers."""

from __future__ import annotations

from collections import Counter

from aiohttp import web

from tests.support.served import ServedSite


class LocalSite(ServedSite):
    """Serves generated pages on 127.0.0.1 and counts every request per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        super().__init__()
        r = self.app.router
        r.add_get("/page/{n}", self.page)
        r.add_get("/flaky/{key}", self.flaky)
        r.add_get("/slow", self.slow)
        r.add_get("/missing", self.missing)
        r.add_get("/limited/{key}", self.limited)
        r.add_get("/reset", self.reset)
        r.add_get("/redirect/{n}", self.redirect)
        r.add_get("/big", self.big)
        r.add_get("/binary", self.binary)
        r.add_get("/legacy", self.legacy)
        self.delay = 0.0

    def _count(self, request: web.Request) -> None:
        self.hits[request.path] += 1

    async def page(self, request: web.Request) -> web.Response:
        self._count(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await self._sleep(self.delay)
            n = request.match_info["n"]
            html = (
                f"<html><head><title>Page {n}</title></head><body>"
                f"<h1>Product {n}</h1><span class='price'>{n}.99</span>"
                f"<a href='/page/{int(n) + 1}'>next</a></body></html>"
            )
            return web.Response(text=html, content_type="text/html")
        finally:
            self.active -= 1

    async def flaky(self, request: web.Request) -> web.Response:
        """503 twice, then 200."""
        self._count(request)
        if self.hits[request.path] <= 2:
            return web.Response(status=503, text="busy")
        return web.Response(text="<h1>finally</h1>", content_type="text/html")

    async def limited(self, request: web.Request) -> web.Response:
        """429 with Retry-After: 1 once, then 200."""
        self._count(request)
        if self.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        return web.Response(text="<h1>ok now</h1>", content_type="text/html")

    async def slow(self, request: web.Request) -> web.Response:
        self._count(request)
        await self._sleep(30)
        return web.Response(text="too late")

    async def missing(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(status=404, text="<h1>nope</h1>", content_type="text/html")

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"<html>" + b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def redirect(self, request: web.Request) -> web.Response:
        self._count(request)
        n = int(request.match_info["n"])
        if n <= 0:
            return web.Response(text="<h1>landed</h1>", content_type="text/html")
        raise web.HTTPFound(f"/redirect/{n - 1}")

    async def big(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(request)
        chunk = b"a" * 65536
        for _ in range(11 * 16):  # 11 MiB
            await response.write(chunk)
        await response.write_eof()
        return response

    async def binary(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + bytes(2000), content_type="image/png")

    async def legacy(self, request: web.Request) -> web.Response:
        self._count(request)
        body = (
            "<html><head><meta charset='windows-1251'></head>"
            "<body><h1>Привет, мир</h1></body></html>"
        ).encode("cp1251")
        return web.Response(body=body, headers={"Content-Type": "text/html"})
