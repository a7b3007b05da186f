"""Task handlers: what the executor does with one claimed task (fetch + extract)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import Settings
from app.database.connection import ConnectionManager
from app.scraper.extract import CompiledSpec, Document, compile_spec, extract
from app.scraper.fetch import Fetcher, FetchResult
from app.scraper.links import discover_links
from app.scraper.scope import CrawlScope
from app.scraper.sitemaps import collect_sitemap_urls, sitemap_start_urls
from app.scraper.ssrf import SSRFGuard
from app.services.queue import ClaimedTask, Outcome, PageRow, mark_fetch_started
from app.services.robots_cache import RobotsCache

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class JobContext:
    """What a worker needs to know about a job to run its tasks (immutable, cached)."""

    job_id: uuid.UUID
    kind: str
    spec: dict[str, Any]
    compiled: CompiledSpec | None
    timeout_s: float
    headers: dict[str, str] = field(default_factory=dict)
    user_agent: str | None = None
    per_host_concurrency: int = 8
    delay_s: float = 0.0
    crawl: CrawlRules | None = None


async def load_job_context(
    conn: AsyncConnection, job_ids: Sequence[uuid.UUID], settings: Settings
) -> list[JobContext]:
    rows = await conn.execute(
        text("SELECT id, kind, spec FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"),
        {"ids": list(job_ids)},
    )
    return [context_from_spec(row[0], row[1], row[2], settings) for row in rows]


def context_from_spec(
    job_id: uuid.UUID, kind: str, spec: dict[str, Any], settings: Settings
) -> JobContext:
    options = spec.get("options") or {}
    politeness = spec.get("politeness") or {}
    extract_spec = spec.get("extract") or {}
    compiled = compile_spec(extract_spec) if extract_spec else None
    return JobContext(
        job_id=job_id,
        kind=kind,
        spec=spec,
        compiled=compiled,
        timeout_s=float(options.get("timeout_s") or 30),
        headers=dict(options.get("headers") or {}),
        user_agent=options.get("user_agent"),
        per_host_concurrency=int(
            politeness.get("per_host_concurrency") or settings.per_host_concurrency
        ),
        delay_s=float(politeness.get("delay_ms") or 0) / 1000.0,
        crawl=CrawlRules.from_spec(spec) if kind == "crawl" else None,
    )


class TaskHandler(Protocol):
    async def __call__(self, task: ClaimedTask, ctx: JobContext) -> Outcome: ...

    async def close(self) -> None: ...


# called with a task's id once its requests to the host are over (parsing may go on)
FetchedHook = Callable[[int], None]


def _no_hook(_task_id: int) -> None:
    return None


def page_from_fetch(task: ClaimedTask, result: FetchResult, data: dict[str, Any]) -> PageRow:
    return PageRow(
        url=task.url,
        final_url=result.final_url,
        status_code=result.status_code,
        ok=result.ok,
        depth=task.depth,
        content_type=result.content_type,
        elapsed_ms=result.elapsed_ms,
        data=data,
        error=result.error,
    )


def crash_outcome(task: ClaimedTask, error: BaseException) -> Outcome:
    message = f"internal error while processing the page: {type(error).__name__}"
    page = PageRow(
        url=task.url,
        final_url=None,
        status_code=None,
        ok=False,
        depth=task.depth,
        content_type=None,
        elapsed_ms=None,
        error=message,
    )
    return Outcome(task.id, task.job_id, "failed", page=page, error=message)


def exhausted(task: ClaimedTask, outcome: Outcome) -> Outcome:
    """A retryable failure on the last attempt: store it as failed, with its page."""
    error = f"{outcome.error} (after {task.attempts} attempts)"
    page = outcome.page
    if page is not None:
        page.error = error
    return Outcome(task.id, task.job_id, "failed", page=page, error=error)


class ScrapeHandler:
    """Fetch the URL, extract the job's fields, classify the result."""

    def __init__(self, settings: Settings, fetcher: Fetcher | None = None) -> None:
        self.fetcher = fetcher or Fetcher(
            user_agent=settings.user_agent,
            max_body_bytes=settings.max_body_bytes,
            max_redirects=settings.max_redirects,
            guard=SSRFGuard(
                allow_private=settings.allow_private_networks, allow_cidrs=settings.allowed_cidrs
            ),
            limit=max(settings.worker_concurrency, 10),
        )
        # the executor's: the task no longer occupies a connection to its host
        self.on_fetched: FetchedHook = _no_hook

    async def __call__(self, task: ClaimedTask, ctx: JobContext) -> Outcome:
        result = await self.fetcher.fetch(
            task.url, headers=ctx.headers, timeout_s=ctx.timeout_s, user_agent=ctx.user_agent
        )
        self.on_fetched(task.id)
        data: dict[str, Any] = {}
        if result.ok and result.text is not None and result.is_html and ctx.compiled:
            document = Document(result.text, result.final_url)
            data = extract(document, result.final_url, ctx.compiled)
        return self.classify(task, result, page_from_fetch(task, result, data))

    @staticmethod
    def classify(task: ClaimedTask, result: FetchResult, page: PageRow) -> Outcome:
        if result.ok:
            return Outcome(task.id, task.job_id, "succeeded", page=page)
        if result.retryable:
            return Outcome(
                task.id,
                task.job_id,
                "retry",
                page=page,
                error=result.error,
                retry_in_s=result.retry_after or 0.0,
                retry_after_host=result.retry_after is not None,
            )
        return Outcome(task.id, task.job_id, "failed", page=page, error=result.error)

    async def close(self) -> None:
        await self.fetcher.close()


@dataclass(slots=True)
class CrawlRules:
    """A crawl job's follow rules, compiled once per job and cached with its context."""

    scope: CrawlScope
    max_depth: int
    respect_robots: bool
    follow_nofollow: bool
    sitemaps: bool
    # link (absolute, as found) -> its canonical form when in scope, else None: the same
    # links recur on most pages of a site, and scope + canonicalisation were a quarter of a
    # crawling worker's CPU (bench/crawl profile). Depth is checked apart, per page.
    links: dict[str, str | None] = field(default_factory=dict)

    def canonical_in_scope(self, url: str) -> str | None:
        if self.scope.admits(url, 0) is not None:
            return None
        try:
            return self.scope.canonicalize(url)
        except ValueError:
            return None  # unparseable link: nothing to fetch

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CrawlRules:
        follow = spec.get("follow") or {}
        politeness = spec.get("politeness") or {}
        seeds = spec.get("seeds") or spec.get("urls") or []
        max_depth = int(follow.get("max_depth", 3))
        return cls(
            scope=CrawlScope(
                seeds,
                same_site=bool(follow.get("same_site", True)),
                allow_subdomains=bool(follow.get("allow_subdomains", False)),
                include=follow.get("include") or (),
                exclude=follow.get("exclude") or (),
                max_depth=max_depth,
                ignore_query=follow.get("ignore_query", False),
            ),
            max_depth=max_depth,
            respect_robots=bool(politeness.get("respect_robots", True)),
            follow_nofollow=bool(follow.get("follow_nofollow", False)),
            sitemaps=bool(follow.get("sitemaps", False)),
        )


# links followed from one page at most (in document order); the rest are not enqueued
MAX_LINKS_PER_PAGE = 5_000
# links remembered per crawl job (raw link -> canonical form or out of scope)
LINK_CACHE_SIZE = 20_000
_UNKNOWN: Any = object()


class PageHandler(ScrapeHandler):
    """Scrape jobs fetch and extract; crawl jobs also honour robots.txt and follow links."""

    def __init__(
        self, settings: Settings, db: ConnectionManager, fetcher: Fetcher | None = None
    ) -> None:
        super().__init__(settings, fetcher)
        self.db = db
        self.robots = RobotsCache(db, self.fetcher, settings.user_agent)
        self.user_agent = settings.user_agent
        # Crawl-delay spacing per host in this process: the next allowed fetch start
        self._next_start: dict[str, float] = {}

    async def __call__(self, task: ClaimedTask, ctx: JobContext) -> Outcome:
        rules = ctx.crawl
        if rules is None:
            await self._starting(task, 0.0)
            return await super().__call__(task, ctx)
        crawl_delay = 0.0
        if rules.respect_robots:
            policy = await self.robots.policy(task.url)
            if not policy.allowed(task.url, ctx.user_agent or self.user_agent):
                reason = "disallowed by robots.txt"
                if policy.mode != "rules":
                    reason += f" ({policy.mode}: robots.txt unavailable)"
                return Outcome(task.id, task.job_id, "skipped", error=reason)
            delay = policy.crawl_delay(ctx.user_agent or self.user_agent)
            if delay:
                await self._space(task.host, delay)
                crawl_delay = delay
        await self._starting(task, crawl_delay)
        result = await self.fetcher.fetch(
            task.url, headers=ctx.headers, timeout_s=ctx.timeout_s, user_agent=ctx.user_agent
        )
        sitemap_links: list[tuple[str, int]] = []
        if task.depth == 0 and rules.sitemaps and result.ok:
            sitemap_links = await self._sitemap_links(rules, task, ctx)
        self.on_fetched(task.id)
        data: dict[str, Any] = {}
        links: list[tuple[str, int]] = []
        if result.ok and result.text is not None and result.is_html:
            document = Document(result.text, result.final_url)
            if ctx.compiled:
                data = extract(document, result.final_url, ctx.compiled)
            if task.depth < rules.max_depth:
                found = discover_links(
                    document,
                    result.final_url,
                    follow_nofollow=rules.follow_nofollow,
                    limit=MAX_LINKS_PER_PAGE,
                )
                links = self._in_scope(rules, found, task.depth + 1)
        links.extend(sitemap_links)
        page = page_from_fetch(task, result, data)
        outcome = self.classify(task, result, page)
        if outcome.state == "succeeded":
            outcome.links = links
        return outcome

    async def _starting(self, task: ClaimedTask, crawl_delay: float) -> None:
        """The fetch starts now: with a delay on its host, no worker anywhere may start the
        next one before a delay from now (the claim reads hosts.next_fetch_at). Crawl-delay
        may have been learnt only just now, with this host's first robots.txt."""
        delay = max(task.delay_ms / 1000.0, crawl_delay)
        if delay:
            async with self.db.connect() as conn:
                await mark_fetch_started(conn, task.host, delay)

    async def _space(self, host: str, delay: float) -> None:
        # reserve the next start slot before sleeping, so concurrent tasks queue up
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next_start.get(host, 0.0))
        self._next_start[host] = start + delay
        if start > now:
            await asyncio.sleep(start - now)

    @staticmethod
    def _in_scope(rules: CrawlRules, urls: Sequence[str], depth: int) -> list[tuple[str, int]]:
        if depth > rules.max_depth:
            return []
        known = rules.links
        admitted: list[tuple[str, int]] = []
        for url in urls:
            canonical = known.get(url, _UNKNOWN)
            if canonical is _UNKNOWN:
                canonical = rules.canonical_in_scope(url)
                if len(known) >= LINK_CACHE_SIZE:
                    known.clear()  # bounded: a crawl's links mostly repeat within a while
                known[url] = canonical
            if canonical is not None:
                admitted.append((canonical, depth))
        return admitted

    async def _sitemap_links(
        self, rules: CrawlRules, task: ClaimedTask, ctx: JobContext
    ) -> list[tuple[str, int]]:
        robots_sitemaps: list[str] = []
        if rules.respect_robots:
            robots_sitemaps = (await self.robots.policy(task.url)).sitemaps
        urls = await collect_sitemap_urls(
            self.fetcher, sitemap_start_urls(task.url, robots_sitemaps)
        )
        return self._in_scope(rules, urls, 1)
