"""The ceiling of one Python process: a bare in-memory asyncio crawler.

    python bench/crawl/bare.py START_URL --out pages.jsonl [--max-pages N] [--concurrency 64]

aiohttp (one keep-alive session) + selectolax (lexbor) + uvloop, ``--concurrency`` fetch
loops sharing an asyncio queue, a set for dedupe, same-origin links only, fragments
dropped, the FIELDS of sitegen.py extracted from every page, one JSON line per page. No
robots.txt, no retries, no persistence: what a crawl costs with nothing else around it.
Prints a JSON summary (pages, first/last page times, CPU, peak RSS = VmHWM) last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
import uvloop
from selectolax.lexbor import LexborHTMLParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sitegen import FIELDS, collapse, peak_rss_kb


async def crawl(start: str, out: Path, max_pages: int, concurrency: int) -> dict[str, object]:
    parts = urlsplit(start)
    origin = f"{parts.scheme}://{parts.netloc}"
    seen: set[str] = {start}
    queue: asyncio.Queue[str] = asyncio.Queue()
    queue.put_nowait(start)
    stats = {"pages": 0, "ok": 0, "errors": 0, "first": 0.0, "last": 0.0}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    with out.open("wb") as sink:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def fetch_loop() -> None:
                while True:
                    url = await queue.get()
                    try:
                        record = await visit(session, url)
                    except (aiohttp.ClientError, TimeoutError) as error:
                        record = {"url": url, "status": None, "error": repr(error)}
                        stats["errors"] += 1
                    sink.write(orjson.dumps(record) + b"\n")
                    now = time.time()
                    if not stats["pages"]:
                        stats["first"] = now
                    stats["last"] = now
                    stats["pages"] += 1
                    queue.task_done()

            async def visit(session: aiohttp.ClientSession, url: str) -> dict[str, object]:
                async with session.get(url) as response:
                    body = await response.read()
                    status = response.status
                record: dict[str, object] = {"url": url, "status": status}
                if status != 200:
                    return record
                stats["ok"] += 1
                tree = LexborHTMLParser(body.decode("utf-8", "replace"))
                for name, selector in FIELDS.items():
                    node = tree.css_first(selector)
                    record[name] = collapse(node.text()) if node is not None else None
                for node in tree.css("a[href]"):
                    href = node.attributes.get("href")
                    if not href or href.startswith("#"):
                        continue
                    link = urljoin(url, href).split("#", 1)[0]
                    if link.startswith(origin) and link not in seen and len(seen) < max_pages:
                        seen.add(link)
                        queue.put_nowait(link)
                return record

            started = time.time()
            cpu0 = time.process_time()
            loops = [asyncio.create_task(fetch_loop()) for _ in range(concurrency)]
            await queue.join()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            cpu = time.process_time() - cpu0
            wall = time.time() - started
    return {
        **stats,
        "wall_s": wall,
        "cpu_s": cpu,
        "maxrss_kb": peak_rss_kb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("start")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-pages", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    summary = uvloop.run(crawl(args.start, args.out, args.max_pages, args.concurrency))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
