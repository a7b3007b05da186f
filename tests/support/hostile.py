"""Hostile targets on loopback: each misbehaves in one way a real site (or attacker) can.

HostileSite (aiohttp) answers with an endless body, a gzip bomb, a redirect loop, a page of
100,000 links (and /dense/<bytes>: nothing but links), invalid UTF-8 and a connection reset
mid-body; `trickle_and_silence` is a bare
TCP server for what no HTTP framework sends: a response trickled a byte per second
(slowloris) and a connection that is accepted and never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from tests.support.served import ServedSite
from tests.support.servers import serve_raw

MiB = 1024 * 1024
LINKS = 100_000


@functools.cache
def gzip_bomb(size: int) -> bytes:
    """``size`` bytes of zeros, gzip-compressed (~1/1000 of that on the wire)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    block = b"\0" * MiB
    parts = [compressor.compress(block) for _ in range(size // MiB)]
    return b"".join([*parts, compressor.flush()])


@functools.cache
def _links_page() -> bytes:
    anchors = "".join(f'<a href="/l/{n}">{n}</a>' for n in range(LINKS))
    return f"<html><head><title>links</title></head><body><h1>links</h1>{anchors}</body>".encode()


@functools.cache
def dense_links_page(size: int) -> bytes:
    """As many distinct links as fit in ``size`` bytes (~590,000 in 10 MiB)."""
    parts: list[bytes] = [b"<html><head><title>dense</title></head><body><h1>dense</h1>"]
    total, n = len(parts[0]), 0
    while total < size - 32:
        anchor = f'<a href="/{n}">'.encode()
        parts.append(anchor)
        total += len(anchor)
        n += 1
    return b"".join(parts)


class HostileSite(ServedSite):
    """Counts requests per path; every route misbehaves, but /links and /bad-utf8 answer."""

    def __init__(self, *, bomb_size: int = 200 * MiB) -> None:
        super().__init__()
        self.hits: Counter[str] = Counter()
        self.endless_bytes = 0  # what the endless route managed to send in all
        self._bomb = gzip_bomb(bomb_size)
        r = self.app.router
        r.add_get("/endless", self.endless)
        r.add_get("/bomb", self.bomb)
        r.add_get("/loop-a", self.loop_a)
        r.add_get("/loop-b", self.loop_b)
        r.add_get("/links", self.links)
        r.add_get("/dense/{size}", self.dense)
        r.add_get("/bad-utf8", self.bad_utf8)
        r.add_get("/reset", self.reset)

    def _count(self, request: web.Request) -> None:
        self.hits[request.path] += 1

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """200 text/html with no Content-Length, and a body that never ends."""
        self._count(request)
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(request)
        chunk = b"<p>" + b"a" * 65530 + b"</p>"
        with contextlib.suppress(ConnectionError):
            while not self._closing.is_set():
                await response.write(chunk)
                self.endless_bytes += len(chunk)
        return response

    async def bomb(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(
            body=self._bomb, headers={"Content-Type": "text/html", "Content-Encoding": "gzip"}
        )

    async def loop_a(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPFound("/loop-b")

    async def loop_b(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPFound("/loop-a")

    async def links(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=_links_page(), content_type="text/html")

    async def dense(self, request: web.Request) -> web.Response:
        """A page of ``size`` bytes that is nothing but short distinct links."""
        self._count(request)
        size = int(request.match_info["size"])
        return web.Response(body=dense_links_page(size), content_type="text/html")

    async def bad_utf8(self, request: web.Request) -> web.Response:
        self._count(request)
        body = b"<html><body><h1>ok \xff\xfe\xc3( broken \xe2\x82</h1></body></html>"
        return web.Response(body=body, headers={"Content-Type": "text/html; charset=utf-8"})

    async def reset(self, request: web.Request) -> web.StreamResponse:
        """Promises 100,000 bytes, sends 4,000, then resets the connection."""
        self._count(request)
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"<html><body>" + b"x" * 4000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response


@asynccontextmanager
async def trickle_and_silence() -> AsyncIterator[tuple[str, Counter[str]]]:
    """A bare TCP server: ``/slowloris`` gets a response one byte per second, forever;
    anything else (``/never``) is read and never answered. Yields (base URL, requests)."""
    seen: Counter[str] = Counter()
    closing = asyncio.Event()
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Slow: " + b"z" * 10_000

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        parts = line.decode("latin-1").split()
        path = parts[1] if len(parts) > 1 else "?"
        seen[path] += 1
        with contextlib.suppress(ConnectionError):
            if path == "/slowloris":
                for byte in response:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closing.wait(), 1.0)
                    if closing.is_set():
                        return
            while await reader.read(65536):
                pass  # never a byte back; ends when the client hangs up

    async with serve_raw(handle) as base:
        try:
            yield base, seen
        finally:
            closing.set()
