"""Benchmark async HTTP clients (aiohttp, httpx, Trawler's Fetcher) against one local server."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.scraper.fetch import Fetcher
from app.scraper.ssrf import SSRFGuard

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional
    uvloop = None

PAGE_BYTES = 10 * 1024


def make_page() -> bytes:
    head = b"<!doctype html><html><head><meta charset='utf-8'><title>Bench</title></head><body>"
    row = b"<p class='row'>Lorem ipsum dolor sit amet, consectetur adipiscing elit.</p>\n"
    body = head
    i = 0
    while len(body) < PAGE_BYTES - 200:
        body += row if i % 5 else f"<a href='/p/{i}'>link {i}</a>\n".encode()
        i += 1
    return body + b"</body></html>"


# --- server (runs in a child process so it does not share the client's CPU time) -----------


def serve(port: int) -> None:
    page = make_page()

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())


# --- clients ---------------------------------------------------------------------------------

FetchOne = Callable[[str], Awaitable[int]]


async def drive(fetch_one: FetchOne, base: str, total: int, concurrency: int) -> float:
    """Fetch ``total`` pages with ``concurrency`` workers; return the wall time in seconds."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            size = await fetch_one(f"{base}/p/{i}")
            if size < PAGE_BYTES - 512:
                raise RuntimeError(f"short body: {size} bytes")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run_aiohttp(base: str, total: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fetch_one(url: str) -> int:
            async with session.get(url) as response:
                return len(await response.read())

        return await drive(fetch_one, base, total, concurrency)


async def run_httpx(base: str, total: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, http2=False, timeout=30.0) as client:

        async def fetch_one(url: str) -> int:
            response = await client.get(url)
            return len(response.content)

        return await drive(fetch_one, base, total, concurrency)


async def run_fetcher(base: str, total: int, concurrency: int) -> float:
    # The production path: SSRF check per hop, bounded body read, charset decoding.
    guard = SSRFGuard(allow_cidrs=["127.0.0.1/32"])
    async with Fetcher(guard=guard, limit=concurrency) as fetcher:

        async def fetch_one(url: str) -> int:
            result = await fetcher.fetch(url)
            if not result.ok:
                raise RuntimeError(result.error)
            return result.body_bytes

        return await drive(fetch_one, base, total, concurrency)


CLIENTS: dict[str, Callable[[str, int, int], Awaitable[float]]] = {  # name -> runner
    "aiohttp.ClientSession": run_aiohttp,
    "httpx.AsyncClient (HTTP/1.1)": run_httpx,
    "trawler Fetcher (aiohttp + guard + decode)": run_fetcher,
}


async def bench(total: int, concurrency: int, rounds: int) -> None:
    server = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", stdout=asyncio.subprocess.PIPE
    )
    assert server.stdout is not None
    try:
        port = int((await server.stdout.readline()).decode().strip())
        base = f"http://127.0.0.1:{port}"
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print(
            f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
            f"httpx {httpx.__version__}, loop={loop_name}, cpus={os.cpu_count()}"
        )
        print(
            f"{total} pages of {len(make_page())} bytes, concurrency {concurrency}, "
            f"{rounds} rounds per client (interleaved), server in a child process\n"
        )
        for run in CLIENTS.values():  # warm up connections, caches and the server
            await run(base, 500, concurrency)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
        for _ in range(rounds):
            for name, run in CLIENTS.items():
                cpu_before = time.process_time()
                wall = await run(base, total, concurrency)
                cpu = time.process_time() - cpu_before
                results[name].append((total / wall, cpu / total * 1e6))
        width = max(map(len, CLIENTS))
        header = f"{'pages/s (median)':>16}  {'best':>8}  {'client CPU us/page':>18}"
        print(f"{'client':<{width}}  {header}")
        for name, samples in results.items():
            rates = [rate for rate, _ in samples]
            cpu = statistics.median(c for _, c in samples)
            print(
                f"{name:<{width}}  {statistics.median(rates):>16,.0f}  {max(rates):>8,.0f}  "
                f"{cpu:>18,.0f}"
            )
    finally:
        server.terminate()
        await server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--pages", type=int, default=5000)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(0)
        return
    coro = bench(args.pages, args.concurrency, args.rounds)
    if uvloop is not None and not args.no_uvloop:
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
