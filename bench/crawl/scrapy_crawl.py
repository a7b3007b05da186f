"""The peer: a Scrapy CrawlSpider over the synthetic site, same extraction, JSONL feed.

    python bench/crawl/scrapy_crawl.py START_URL --out pages.jsonl [--concurrency 64]

Runs with the interpreter of a venv that has Scrapy (bench/crawl/requirements.txt; run.py
creates /tmp/trawler-bench-venv for it). One Rule(LinkExtractor(allow_domains=host),
follow=True) whose callback extracts the FIELDS of sitegen.py with parsel CSS
(``::text``, whitespace collapsed); the start page goes through the same callback, so
every page fetched is one item. CONCURRENT_REQUESTS and CONCURRENT_REQUESTS_PER_DOMAIN =
--concurrency, no download delay, no AutoThrottle, robots.txt obeyed (as Trawler does).
Prints a JSON summary (items, first/last item times, CPU, peak RSS) as its last line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scrapy import signals
from scrapy.crawler import CrawlerProcess
from scrapy.linkextractors import LinkExtractor
from scrapy.spiders import CrawlSpider, Rule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sitegen import FIELDS, collapse, peak_rss_kb

STATS: dict[str, Any] = {"items": 0, "first": 0.0, "last": 0.0}


class SiteSpider(CrawlSpider):
    name = "bench_site"

    def __init__(self, start: str, **kwargs: Any) -> None:
        parts = urlsplit(start)
        self.start_urls = [start]
        self.allowed_domains = [parts.hostname or ""]
        # allow_domains compares host:port with the domain, so it never matches a site on a
        # non-default port; a pattern on the origin is the same scope
        origin = re.escape(f"{parts.scheme}://{parts.netloc}/")
        self.rules = (Rule(LinkExtractor(allow=[origin]), callback="parse_item", follow=True),)
        super().__init__(**kwargs)  # compiles self.rules

    def parse_start_url(self, response: Any) -> Any:
        return self.parse_item(response)

    def parse_item(self, response: Any) -> Any:
        item: dict[str, Any] = {"url": response.url, "status": response.status}
        for name, selector in FIELDS.items():
            item[name] = collapse(response.css(f"{selector}::text").get())
        yield item


def on_item(item: Any, response: Any, spider: Any) -> None:
    now = time.time()
    if not STATS["items"]:
        STATS["first"] = now
    STATS["last"] = now
    STATS["items"] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("start")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    settings = {
        "BOT_NAME": "bench",
        "CONCURRENT_REQUESTS": args.concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": args.concurrency,
        "DOWNLOAD_DELAY": 0,
        "AUTOTHROTTLE_ENABLED": False,
        "ROBOTSTXT_OBEY": True,
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "WARNING",
        "FEEDS": {str(args.out): {"format": "jsonlines", "overwrite": True}},
        "FEED_EXPORT_ENCODING": "utf-8",
    }
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(SiteSpider)
    crawler.signals.connect(on_item, signal=signals.item_scraped)
    started = time.time()
    cpu0 = time.process_time()
    process.crawl(crawler, start=args.start)
    process.start()
    stats = crawler.stats.get_stats() if crawler.stats else {}
    summary = {
        "pages": STATS["items"],
        "first": STATS["first"],
        "last": STATS["last"],
        "wall_s": time.time() - started,
        "cpu_s": time.process_time() - cpu0,
        "maxrss_kb": peak_rss_kb(),
        "requests": stats.get("scheduler/enqueued", 0),
        "dupefiltered": stats.get("dupefilter/filtered", 0),
        "responses": stats.get("downloader/response_count", 0),
        "finish_reason": stats.get("finish_reason"),
    }
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
