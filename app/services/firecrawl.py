"""Firecrawl compatibility: Firecrawl requests as Trawler jobs, Trawler pages as Firecrawl
documents, and the inline operations (scrape one URL, map a site).

Crawls and batch scrapes are ordinary Trawler jobs: the Firecrawl formats become content
built-ins in the job's extract spec (app.scraper.extract: markdown, html, raw_html,
links, images, metadata), so the executor stores them in pages.data like any field, and
the status routes render those pages as Firecrawl documents. What only the compatibility
layer needs (the formats asked for, the webhook, warnings) is kept under
``spec.firecrawl``.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.schemas import (
    MAX_URL_CHARS,
    CrawlCreate,
    FetchOptions,
    FollowRules,
    JobPublic,
    Politeness,
    ScrapeCreate,
    check_regex,
)
from app.database.models import JobKind, JobStatus
from app.errors import BadRequest, Forbidden, NotFound, TrawlerError
from app.scraper.extract import Document, compile_spec, content_builtin, extract
from app.scraper.fetch import Fetcher, FetchResult
from app.scraper.links import discover_links
from app.scraper.robots import RobotsPolicy, robots_url
from app.scraper.scope import CrawlScope
from app.scraper.sitemaps import collect_sitemap_urls, sitemap_start_urls
from app.scraper.ssrf import BlockedTarget, InvalidTarget, SSRFGuard
from app.scraper.urls import canonicalize_url
from app.services import jobs

Api = Literal["v1", "v2"]

# Firecrawl's defaults, where Trawler's differ
DEFAULT_CRAWL_LIMIT: Final = 10_000
DEFAULT_TIMEOUT_MS: Final = 30_000
DEFAULT_MAP_LIMIT: Final = 5_000
MAX_MAP_LIMIT: Final = 100_000
DEFAULT_MAP_TIMEOUT_S: Final = 60.0
MAX_LINK_DEPTH: Final = 100  # FollowRules.max_depth's ceiling: "unlimited" in Firecrawl terms
MAX_PER_HOST: Final = 64  # Politeness.per_host_concurrency's ceiling
# Crawl status pages: Firecrawl's page size bound, and a bound on stored bytes per page
DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
PAGE_BYTES_BUDGET: Final = 10 * 1024 * 1024
MAX_ERRORS_LISTED: Final = 10_000
MAX_ACTIVE_LISTED: Final = 1000
# Trawler keeps results until the job is deleted or purged; Firecrawl clients expect a
# date, which is reported as Firecrawl's own retention after the job finished.
REPORTED_RETENTION: Final = timedelta(hours=24)

# Firecrawl format -> (document key, content built-in; None: choose by onlyMainContent)
_SUPPORTED_FORMATS: Final[dict[str, tuple[str, str | None]]] = {
    "markdown": ("markdown", None),
    "content": ("markdown", None),  # v0's name of markdown, still accepted by v1
    "html": ("html", None),
    "rawHtml": ("rawHtml", "raw_html"),
    "links": ("links", "links"),
    "images": ("images", "images"),
}
# Formats Firecrawl has that need a browser or a language model: accepted, not produced
_UNSUPPORTED_FORMATS: Final = frozenset(
    {
        "screenshot",
        "screenshot@fullPage",
        "summary",
        "json",
        "extract",
        "changeTracking",
        "branding",
        "attributes",
        "query",
        "question",
        "highlights",
        "audio",
        "video",
        "product",
        "menu",
    }
)
# a document's content keys, in the order they are written
DOCUMENT_KEYS: Final = ("markdown", "html", "rawHtml", "links", "images", "metadata")
_FORMAT_ALIASES: Final = {"raw_html": "rawHtml", "change_tracking": "changeTracking"}


# --------------------------------------------------------------------------------------
# Requests: Firecrawl's camelCase bodies; unknown fields are ignored as Firecrawl clients
# send many that Trawler has no use for (origin, integration, proxy, mobile, ...)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# Firecrawl sets no upper bounds; these only keep numbers computable and storable (64-bit)
_MAX_INT: Final = 2**63 - 1


Webhook = str | dict[str, Any]


class ScrapeOptionsIn(_Lenient):
    formats: list[str | dict[str, Any]] | None = None
    only_main_content: bool | None = Field(default=None, alias="onlyMainContent")
    headers: dict[str, str] | None = None
    timeout: int | None = Field(default=None, ge=1, le=_MAX_INT, description="milliseconds")
    include_tags: list[str] | None = Field(default=None, alias="includeTags")
    exclude_tags: list[str] | None = Field(default=None, alias="excludeTags")
    actions: list[Any] | None = None


class ScrapeIn(ScrapeOptionsIn):
    url: str


class BatchScrapeIn(ScrapeOptionsIn):
    urls: list[str] = Field(min_length=1)
    webhook: Webhook | None = None
    ignore_invalid_urls: bool | None = Field(default=None, alias="ignoreInvalidURLs")
    max_concurrency: int | None = Field(default=None, ge=1, le=_MAX_INT, alias="maxConcurrency")
    append_to_id: str | None = Field(default=None, alias="appendToId")


class CrawlIn(_Lenient):
    url: str
    limit: int | None = Field(default=None, ge=1, le=_MAX_INT)
    max_discovery_depth: int | None = Field(
        default=None, ge=0, le=_MAX_INT, alias="maxDiscoveryDepth"
    )
    max_depth: int | None = Field(default=None, ge=0, le=_MAX_INT, alias="maxDepth")
    include_paths: list[str] | None = Field(default=None, alias="includePaths")
    exclude_paths: list[str] | None = Field(default=None, alias="excludePaths")
    regex_on_full_url: bool | None = Field(default=None, alias="regexOnFullURL")
    crawl_entire_domain: bool | None = Field(default=None, alias="crawlEntireDomain")
    allow_backward_links: bool | None = Field(default=None, alias="allowBackwardLinks")
    allow_external_links: bool | None = Field(default=None, alias="allowExternalLinks")
    allow_subdomains: bool | None = Field(default=None, alias="allowSubdomains")
    sitemap: Literal["include", "skip", "only"] | None = None
    ignore_sitemap: bool | None = Field(default=None, alias="ignoreSitemap")
    ignore_robots_txt: bool | None = Field(default=None, alias="ignoreRobotsTxt")
    ignore_query_parameters: bool | None = Field(default=None, alias="ignoreQueryParameters")
    # at most Politeness.delay_ms's 60 s (an infinite or huge delay overflowed)
    delay: float | None = Field(default=None, ge=0, le=60, description="seconds between fetches")
    max_concurrency: int | None = Field(default=None, ge=1, le=_MAX_INT, alias="maxConcurrency")
    webhook: Webhook | None = None
    scrape_options: ScrapeOptionsIn | None = Field(default=None, alias="scrapeOptions")


class MapIn(_Lenient):
    url: str
    search: str | None = None
    sitemap: Literal["include", "skip", "only"] | None = None
    ignore_sitemap: bool | None = Field(default=None, alias="ignoreSitemap")  # v1
    sitemap_only: bool | None = Field(default=None, alias="sitemapOnly")  # v1
    include_subdomains: bool | None = Field(default=None, alias="includeSubdomains")
    ignore_query_parameters: bool | None = Field(default=None, alias="ignoreQueryParameters")
    limit: int | None = Field(default=None, ge=1, le=_MAX_INT)
    timeout: int | None = Field(default=None, ge=1, le=_MAX_INT, description="milliseconds")

    @field_validator("search")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


def validation_summary(errors: Sequence[Mapping[str, Any]]) -> str:
    """The first problems of a request that failed validation, on one line."""
    parts = []
    for item in list(errors)[:5]:
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}")
    return "; ".join(parts) or "invalid request"


# --------------------------------------------------------------------------------------
# Mapping Firecrawl options onto Trawler's job spec


_SCHEME: Final = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def normalize_url(url: str) -> str:
    """Firecrawl prepends http:// to a URL without a scheme; then it must canonicalize."""
    url = url.strip()
    if not url:
        raise BadRequest("url: must not be empty")
    if _SCHEME.match(url) is None:
        url = f"http://{url}"
    try:
        canonicalize_url(url)
    except ValueError as error:
        raise BadRequest(f"invalid URL {url[:200]!r}: {error}") from None
    return url


@dataclass(frozen=True, slots=True)
class Formats:
    """What to produce per page: extract fields (document key -> built-in), warnings."""

    fields: dict[str, str]
    names: list[str]
    warnings: list[str]


def formats_spec(options: ScrapeOptionsIn) -> Formats:
    """Firecrawl formats (strings or {"type": ...} objects) as content built-ins.

    metadata is always produced. Formats that need a browser or a language model are
    accepted and reported in a warning; unknown names are a 400."""
    main = options.only_main_content is not False  # Firecrawl's default is true
    fields: dict[str, str] = {}
    names: list[str] = []
    unsupported: list[str] = []
    for item in options.formats if options.formats is not None else ["markdown"]:
        name = item.get("type") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name:
            raise BadRequest("formats: each format is a name or an object with a 'type'")
        name = _FORMAT_ALIASES.get(name, name)
        if name in _SUPPORTED_FORMATS:
            key, builtin = _SUPPORTED_FORMATS[name]
            if builtin is None:
                builtin = f"{key}_main" if main else key
            fields[key] = builtin
            names.append(name)
        elif name in _UNSUPPORTED_FORMATS:
            unsupported.append(name)
        else:
            raise BadRequest(f"formats: unknown format {name!r}")
    fields["metadata"] = "metadata"
    warnings = []
    if unsupported:
        warnings.append(
            f"formats not supported by Trawler (no browser or language model): "
            f"{', '.join(sorted(set(unsupported)))}; they are left out of the documents"
        )
    if options.actions:
        warnings.append("actions need a browser and are not supported by Trawler; ignored")
    if options.include_tags or options.exclude_tags:
        warnings.append("includeTags/excludeTags are not supported by Trawler; ignored")
    return Formats(fields=fields, names=names, warnings=warnings)


def fetch_options(options: ScrapeOptionsIn) -> FetchOptions:
    timeout_ms = options.timeout or DEFAULT_TIMEOUT_MS
    try:
        return FetchOptions(
            timeout_s=min(max(timeout_ms / 1000.0, 1.0), 300.0),
            headers=options.headers or {},
        )
    except ValidationError as error:
        raise BadRequest(validation_summary(error.errors())) from None


def _extract(formats: Formats) -> dict[str, Any]:
    return {key: {"builtin": builtin} for key, builtin in formats.fields.items()}


def _webhook(value: Webhook | None) -> dict[str, Any] | None:
    """The Firecrawl webhook as given (kept in spec.firecrawl.webhook)."""
    if value is None:
        return None
    hook = {"url": value} if isinstance(value, str) else dict(value)
    url = hook.get("url")
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise BadRequest("webhook: needs an http(s) 'url'")
    return hook


# Firecrawl's webhook events and Trawler's (the payloads are Trawler's, see FIRECRAWL.md)
_WEBHOOK_EVENTS: Final = {
    "started": "job.started",
    "page": "job.page",
    "completed": "job.completed",
    "failed": "job.failed",
}


def _native_webhook(hook: dict[str, Any] | None) -> dict[str, Any] | None:
    """Delivered by Trawler's webhooks: url, headers and the mapped events."""
    if hook is None:
        return None
    native: dict[str, Any] = {"url": hook["url"]}
    headers = hook.get("headers")
    if isinstance(headers, dict) and headers:
        native["headers"] = {str(k): str(v) for k, v in headers.items()}
    events = hook.get("events")
    if isinstance(events, list) and events:
        unknown = [e for e in events if e not in _WEBHOOK_EVENTS]
        if unknown:
            raise BadRequest(f"webhook.events: unknown {unknown}; use {sorted(_WEBHOOK_EVENTS)}")
        native["events"] = [_WEBHOOK_EVENTS[e] for e in events]
    return native


# URL-level regular expressions equivalent to Firecrawl's path ones: Trawler matches its
# include/exclude patterns against the whole canonical URL, Firecrawl against the path.
# The head consumes the authority up to the path's "/" (the lookahead keeps a match from
# backtracking into the host name).
_URL_HEAD: Final = r"^[a-z][a-z0-9+.-]*://[^/?#]*(?=/)"
_PATH_END: Final = r"(?=[?#]|\Z)"


def _split_alternatives(pattern: str) -> list[str]:
    """Top-level alternatives of a regular expression (| outside groups and classes)."""
    parts: list[str] = []
    depth = 0
    in_class = False
    start = 0
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "]":
                i += 1  # "[]...]": the first ] is literal
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts


def _path_end_anchors(alternative: str) -> str:
    """`$` (outside classes) means the end of the path: before the query or fragment."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(alternative):
        char = alternative[i]
        if char == "\\":
            out.append(alternative[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            out.append(_PATH_END)
            i += 1
            continue
        out.append(char)
        i += 1
    return "".join(out)


def path_pattern(pattern: str, *, field: str) -> str:
    """Firecrawl's includePaths/excludePaths semantics (a regex searched in the URL path)
    as a regex searched in the whole URL: `^` anchors at the start of the path, `$` at
    its end, and an unanchored match must start inside the path."""
    _check_regex(pattern, field)
    alternatives = []
    for alternative in _split_alternatives(pattern):
        alternative = _path_end_anchors(alternative)
        if alternative.startswith("^"):
            alternatives.append(alternative[1:])
        else:
            alternatives.append(r"[^?#]*?" + alternative)
    return f"{_URL_HEAD}(?:{'|'.join(alternatives)})"


def _follow_patterns(body: CrawlIn, seed: str) -> tuple[list[str], list[str]]:
    """Trawler include/exclude patterns for the crawl's path rules."""
    seed_path = urlsplit(canonicalize_url(seed)).path or "/"
    entire_domain = bool(body.crawl_entire_domain or body.allow_backward_links)
    # without crawlEntireDomain, Firecrawl follows only URLs under the start URL's path
    below = "" if entire_domain or seed_path == "/" else f"(?={re.escape(seed_path)})"
    full = bool(body.regex_on_full_url)
    include: list[str] = []
    for pattern in body.include_paths or []:
        if full:
            _check_regex(pattern, "includePaths")
            include.append(f"^(?={_URL_HEAD}{below}).*?(?:{pattern})" if below else pattern)
        else:
            translated = path_pattern(pattern, field="includePaths")
            include.append(_URL_HEAD + below + translated.removeprefix(_URL_HEAD))
    if below and not include:
        include.append(_URL_HEAD + below)
    exclude: list[str] = []
    for pattern in body.exclude_paths or []:
        if full:
            _check_regex(pattern, "excludePaths")
            exclude.append(pattern)
        else:
            exclude.append(path_pattern(pattern, field="excludePaths"))
    if body.max_depth is not None:
        # v1's maxDepth counts path segments beyond the start URL's own
        base_depth = len([part for part in seed_path.split("/") if part])
        # no URL (at most MAX_URL_CHARS long) has more segments: a larger count is no
        # limit at all, and a count beyond the regex engine's overflowed
        segments = min(base_depth + body.max_depth + 1, MAX_URL_CHARS)
        exclude.append(f"{_URL_HEAD}(?:/+[^/?#]+){{{segments}}}")
    return include, exclude


def _check_regex(pattern: str, field: str) -> None:
    try:
        check_regex(pattern)
    except ValueError as error:
        raise BadRequest(f"{field}: {error}") from None


def guarded(url: str, guard: SSRFGuard) -> str:
    """The canonical URL; 400 when it is malformed, 403 when the SSRF guard refuses it."""
    canonical = canonicalize_url(url)
    try:
        guard.check_url(canonical)
    except InvalidTarget as error:
        raise BadRequest(f"invalid URL {url[:200]!r}: {error}") from None
    except BlockedTarget as error:
        raise Forbidden(
            f"URL {url[:200]!r} is not allowed: {error}. Private and local targets need "
            "TRAWLER_ALLOW_PRIVATE_NETWORKS or TRAWLER_ALLOWED_CIDRS."
        ) from None
    return canonical


class CompatCrawl(CrawlCreate):
    """A crawl submitted through the Firecrawl API: the native spec plus `firecrawl`."""

    firecrawl: dict[str, Any]


class CompatScrape(ScrapeCreate):
    """A batch scrape submitted through the Firecrawl API."""

    firecrawl: dict[str, Any]


def crawl_request(body: CrawlIn, guard: SSRFGuard, api: Api) -> CompatCrawl:
    """POST /v{1,2}/crawl as a Trawler crawl job (400 for what cannot be one, 403 for a
    target the SSRF guard refuses)."""
    seed = normalize_url(body.url)
    guarded(seed, guard)
    options = body.scrape_options or ScrapeOptionsIn()
    formats = formats_spec(options)
    include, exclude = _follow_patterns(body, seed)
    sitemap = body.sitemap
    if sitemap is None:
        sitemap = "skip" if body.ignore_sitemap else "include"
    depth = MAX_LINK_DEPTH if body.max_discovery_depth is None else body.max_discovery_depth
    warnings = list(formats.warnings)
    if sitemap == "only":
        # Trawler adds sitemap URLs to the links of the start page: no links beyond it
        depth = min(depth, 1)
        warnings.append("sitemap 'only' is served as 'include' limited to the start page")
    delay_ms = round((body.delay or 0) * 1000)
    per_host = min(body.max_concurrency or Politeness().per_host_concurrency, MAX_PER_HOST)
    if delay_ms:
        per_host = 1  # Firecrawl fetches one page at a time when a delay is set
    try:
        follow = FollowRules(
            same_site=not body.allow_external_links,
            allow_subdomains=bool(body.allow_subdomains),
            include=include,
            exclude=exclude,
            max_depth=min(depth, MAX_LINK_DEPTH),
            max_pages=body.limit or DEFAULT_CRAWL_LIMIT,
            sitemaps=sitemap != "skip",
            ignore_query=bool(body.ignore_query_parameters),
        )
        politeness = Politeness(
            respect_robots=not body.ignore_robots_txt,
            per_host_concurrency=per_host,
            delay_ms=delay_ms,
        )
        hook = _webhook(body.webhook)
        return CompatCrawl(
            seeds=[seed],
            webhook=_native_webhook(hook),
            extract=_extract(formats),
            options=fetch_options(options),
            follow=follow,
            politeness=politeness,
            firecrawl={
                "api": api,
                "kind": "crawl",
                "url": seed,
                "formats": formats.names,
                "webhook": hook,
                "warning": " ".join(warnings) or None,
                "options": body.model_dump(mode="json", by_alias=True, exclude_none=True),
            },
        )
    except ValidationError as error:
        raise BadRequest(validation_summary(error.errors())) from None


@dataclass(frozen=True, slots=True)
class BatchRequest:
    request: CompatScrape
    invalid_urls: list[str]


def batch_request(body: BatchScrapeIn, guard: SSRFGuard, api: Api) -> BatchRequest:
    """POST /v2/batch/scrape as a Trawler scrape job; with ignoreInvalidURLs, URLs that
    are malformed (else 400) or refused by the SSRF guard (else 403) are left out and
    listed."""
    if body.append_to_id is not None:
        raise BadRequest("appendToId is not supported by Trawler: start a new batch")
    formats = formats_spec(body)
    urls: list[str] = []
    invalid: list[str] = []
    for raw in body.urls:
        try:
            url = normalize_url(raw)
            guarded(url, guard)
        except (BadRequest, Forbidden):
            if not body.ignore_invalid_urls:
                raise
            invalid.append(raw)
            continue
        urls.append(url)
    if not urls:
        raise BadRequest("urls: no valid URL to scrape")
    try:
        hook = _webhook(body.webhook)
        request = CompatScrape(
            urls=urls,
            webhook=_native_webhook(hook),
            extract=_extract(formats),
            options=fetch_options(body),
            firecrawl={
                "api": api,
                "kind": "batch_scrape",
                "formats": formats.names,
                "webhook": hook,
                "warning": " ".join(formats.warnings) or None,
                "invalidURLs": invalid,
            },
        )
    except ValidationError as error:
        raise BadRequest(validation_summary(error.errors())) from None
    return BatchRequest(request=request, invalid_urls=invalid)


# --------------------------------------------------------------------------------------
# Documents


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    # LangChain and vector stores reject null metadata values: absent means absent
    return {key: value for key, value in values.items() if value is not None}


def document(
    data: Mapping[str, Any],
    *,
    source_url: str,
    url: str | None,
    status_code: int | None,
    content_type: str | None,
    error: str | None,
    scrape_id: str,
) -> dict[str, Any]:
    """A Firecrawl document from a page's stored data and its fetch facts.

    Content built-ins come out under their Firecrawl names; fields of a native extract
    spec (a job submitted to /api/v1) come out as `json`."""
    doc: dict[str, Any] = {key: data[key] for key in DOCUMENT_KEYS[:-1] if key in data}
    own = {key: value for key, value in data.items() if key not in DOCUMENT_KEYS}
    if own:
        doc["json"] = own
    metadata = _drop_none(data.get("metadata") or {})
    metadata.update(
        _drop_none(
            {
                "sourceURL": source_url,
                "url": url or source_url,
                "statusCode": status_code,
                "contentType": content_type,
                "scrapeId": scrape_id,
                "error": error,
            }
        )
    )
    doc["metadata"] = metadata
    return doc


def compat_status(status: str) -> str:
    """Firecrawl knows scraping|completed|failed|cancelled."""
    return "scraping" if status in (JobStatus.queued, JobStatus.running) else str(status)


def expires_at(finished_at: datetime | None) -> datetime:
    return (finished_at or datetime.now(UTC)) + REPORTED_RETENTION


# --------------------------------------------------------------------------------------
# Reads and writes on jobs


async def submit(
    session: AsyncSession,
    tenant: str,
    request: CompatCrawl | CompatScrape,
    *,
    guard: SSRFGuard,
    idempotency_key: str | None,
    default_host_limit: int,
    default_retain_days: int | None,
    prepared: jobs.Prepared | None = None,
) -> JobPublic:
    job, _ = await jobs.submit_job(
        session,
        tenant,
        request,
        guard=guard,
        idempotency_key=idempotency_key,
        default_host_limit=default_host_limit,
        default_retain_days=default_retain_days,
        prepared=prepared,
    )
    return job


_KIND_SQL = text("SELECT kind FROM jobs WHERE id = :id AND tenant = :tenant")


def job_id_or_404(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"job {value[:64]!r} not found") from None


async def _require_kind(
    session: AsyncSession, tenant: str, job_id: uuid.UUID, kind: JobKind
) -> None:
    found = (
        await session.execute(_KIND_SQL, {"id": job_id, "tenant": tenant})
    ).scalar_one_or_none()
    if found is None or found != kind:
        raise NotFound(f"job {job_id} not found")


async def cancel(session: AsyncSession, tenant: str, job_id: uuid.UUID, kind: JobKind) -> str:
    """Cancel a queued or running job; 404 for another kind, 409 once it finished."""
    await _require_kind(session, tenant, job_id, kind)
    job = await jobs.cancel_job(session, tenant, job_id)
    return compat_status(job.status)


# The job row and one page of its successful pages after `skip`, in one round trip. The
# page is cut once the stored size of the rows before it passes the budget (the first
# row always comes); `available` is how many rows the page could have had, so a cut
# page still says there is more.
_STATUS_SQL = text(
    """
SELECT j.kind, j.status, j.total, j.succeeded, j.error, j.finished_at,
       j.spec -> 'firecrawl' AS firecrawl,
       p.id AS page_id, p.url, p.final_url, p.status_code, p.content_type, p.data,
       p.error AS page_error, p.available
FROM jobs j
LEFT JOIN LATERAL (
    SELECT w.* FROM (
        SELECT s.*,
               sum(pg_column_size(s.data)) OVER (ORDER BY s.id) - pg_column_size(s.data)
                   AS stored_before,
               count(*) OVER () AS available
        FROM (
            SELECT id, url, final_url, status_code, content_type, data, error
            FROM pages
            WHERE pages.job_id = j.id AND pages.ok
            ORDER BY pages.id
            OFFSET :skip LIMIT :n
        ) s
    ) w
    WHERE w.stored_before < :budget
) p ON true
WHERE j.id = :id AND j.tenant = :tenant
ORDER BY p.id
"""
)


@dataclass(frozen=True, slots=True)
class StatusPage:
    body: dict[str, Any]
    next_skip: int | None


async def status_page(
    session: AsyncSession,
    tenant: str,
    job_id: uuid.UUID,
    kind: JobKind,
    *,
    skip: int,
    limit: int | None,
) -> StatusPage:
    """One page of a crawl's (or batch scrape's) documents with its progress.

    next_skip is where the next page starts: None on the last page of a finished job;
    while the job runs it is always set (the SDKs stop on an empty page that points at
    itself), as Firecrawl does."""
    size = min(limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    rows = (
        (
            await session.execute(
                _STATUS_SQL,
                {
                    "id": job_id,
                    "tenant": tenant,
                    "skip": skip,
                    "n": size + 1,
                    "budget": PAGE_BYTES_BUDGET,
                },
            )
        )
        .mappings()
        .all()
    )
    if not rows or rows[0]["kind"] != kind:
        raise NotFound(f"job {job_id} not found")
    head = rows[0]
    found = [row for row in rows if row["page_id"] is not None]
    taken = found[:size]
    docs = [
        document(
            row["data"] or {},
            source_url=row["url"],
            url=row["final_url"],
            status_code=row["status_code"],
            content_type=row["content_type"],
            error=row["page_error"],
            scrape_id=str(row["page_id"]),
        )
        for row in taken
    ]
    more = bool(found) and int(found[0]["available"]) > len(taken)
    finished = head["status"] not in (JobStatus.queued, JobStatus.running)
    next_skip = skip + len(taken) if more or not finished else None
    body: dict[str, Any] = {
        "success": True,
        "status": compat_status(head["status"]),
        "completed": int(head["succeeded"]),
        "total": int(head["total"]),
        "creditsUsed": int(head["succeeded"]),
        "expiresAt": expires_at(head["finished_at"]),
        "data": docs,
    }
    firecrawl = head["firecrawl"] or {}
    if firecrawl.get("warning"):
        body["warning"] = firecrawl["warning"]
    if head["status"] == JobStatus.failed and head["error"]:
        body["error"] = head["error"]
    return StatusPage(body=body, next_skip=next_skip)


_ERRORS_SQL = text(
    """
SELECT id, url, status_code, error, fetched_at FROM pages
WHERE job_id = :id AND NOT ok ORDER BY id LIMIT :n
"""
)
_ROBOTS_SQL = text(
    """
SELECT url FROM tasks
WHERE job_id = :id AND status = 'skipped' AND last_error LIKE 'disallowed by robots.txt%'
ORDER BY id LIMIT :n
"""
)


async def errors(
    session: AsyncSession, tenant: str, job_id: uuid.UUID, kind: JobKind
) -> dict[str, Any]:
    """Failed pages and the URLs robots.txt kept the crawl from (at most 10,000 each)."""
    await _require_kind(session, tenant, job_id, kind)
    params = {"id": job_id, "n": MAX_ERRORS_LISTED}
    failed = (await session.execute(_ERRORS_SQL, params)).mappings().all()
    blocked = (await session.execute(_ROBOTS_SQL, params)).scalars().all()
    return {
        "errors": [
            {
                "id": str(row["id"]),
                "timestamp": row["fetched_at"],
                "url": row["url"],
                "code": f"HTTP_{row['status_code']}" if row["status_code"] else None,
                "error": row["error"] or "failed",
            }
            for row in failed
        ],
        "robotsBlocked": list(blocked),
    }


_ACTIVE_SQL = text(
    """
SELECT id, spec FROM jobs
WHERE tenant = :tenant AND kind = 'crawl' AND status IN ('queued', 'running')
ORDER BY created_at DESC, id DESC LIMIT :n
"""
)


async def active_crawls(session: AsyncSession, tenant: str) -> dict[str, Any]:
    rows = (await session.execute(_ACTIVE_SQL, {"tenant": tenant, "n": MAX_ACTIVE_LISTED})).all()
    crawls = []
    for job_id, spec in rows:
        firecrawl = spec.get("firecrawl") or {}
        seeds = spec.get("seeds") or [""]
        crawls.append(
            {
                "id": str(job_id),
                "teamId": tenant,
                "url": firecrawl.get("url") or seeds[0],
                "options": firecrawl.get("options") or {},
            }
        )
    return {"success": True, "crawls": crawls}


# --------------------------------------------------------------------------------------
# Inline operations: nothing is stored (they count against the tenant's request rate)


class UpstreamError(TrawlerError):
    """The target did not answer usefully (Firecrawl answers such scrapes with an error)."""

    status, title = 502, "Bad Gateway"


class UpstreamTimeout(TrawlerError):
    status, title = 408, "Request Timeout"


def _raise_for_fetch(result: FetchResult) -> None:
    """A fetch that got no usable response is an error answer, as in Firecrawl."""
    kind = result.error_kind
    if kind is None or kind == "http":
        return
    message = f"could not scrape {result.url[:200]}: {result.error}"
    if kind == "timeout":
        raise UpstreamTimeout(message)
    if kind == "blocked":
        raise Forbidden(message)
    raise UpstreamError(message)


def check_scrape(guard: SSRFGuard, body: ScrapeIn) -> tuple[str, str, Formats, FetchOptions]:
    """What scrape refuses before fetching (400, 403): the source URL, the URL to fetch,
    the formats and the fetch options."""
    source = normalize_url(body.url)
    return source, guarded(source, guard), formats_spec(body), fetch_options(body)


async def scrape(fetcher: Fetcher, guard: SSRFGuard, body: ScrapeIn) -> dict[str, Any]:
    """POST /v{1,2}/scrape: fetch one URL now and answer its document."""
    source, url, formats, options = check_scrape(guard, body)
    result = await fetcher.fetch(url, headers=options.headers, timeout_s=options.timeout_s)
    _raise_for_fetch(result)
    data: dict[str, Any] = {}
    warnings = list(formats.warnings)
    if result.text is not None and result.is_html:
        data = extract(
            Document(result.text, result.final_url),
            result.final_url,
            compile_spec(_extract(formats)),
        )
    elif result.text is not None:
        # text that is not HTML (plain text, JSON, XML) is served as it is
        for key in formats.fields:
            if key in ("markdown", "html", "rawHtml"):
                data[key] = result.text
    elif result.status_code is not None:
        warnings.append(f"{result.content_type or 'binary'} content is not converted")
    doc = document(
        data,
        source_url=source,
        url=result.final_url,
        status_code=result.status_code,
        content_type=result.content_type,
        error=result.error,
        scrape_id=str(uuid.uuid4()),
    )
    if warnings:
        doc["warning"] = " ".join(warnings)
    return {"success": True, "data": doc}


def _search_terms(search: str | None) -> list[str]:
    return [term for term in (search or "").lower().split() if term]


async def _page_links(
    fetcher: Fetcher, url: str, timeout_s: float
) -> tuple[list[str], dict[str, Any]]:
    result = await fetcher.fetch(url, timeout_s=timeout_s)
    if result.text is None or not result.is_html or not result.ok:
        return [], {}
    doc = Document(result.text, result.final_url)
    meta = content_builtin(doc, "metadata")
    info = {"title": meta.get("title"), "description": meta.get("description")}
    return [result.final_url, *discover_links(doc, result.final_url)], info


async def _sitemap_links(fetcher: Fetcher, url: str, timeout_s: float) -> list[str]:
    robots = await fetcher.fetch(robots_url(url), timeout_s=timeout_s, want_bytes=True)
    policy = RobotsPolicy.from_response(
        robots.status_code,
        robots.body if robots.body is not None else robots.text,
        robots.error_kind if robots.error_kind != "http" else None,
    )
    return await collect_sitemap_urls(fetcher, sitemap_start_urls(url, policy.sitemaps))


def check_map(guard: SSRFGuard, body: MapIn) -> tuple[str, str]:
    """What map_site refuses before fetching (400, 403): the source URL, the URL to map."""
    source = normalize_url(body.url)
    return source, guarded(source, guard)


async def map_site(fetcher: Fetcher, guard: SSRFGuard, body: MapIn) -> dict[str, Any]:
    """POST /v2/map: the site's URLs from its sitemaps and the links of the page itself.

    Same site as the URL (subdomains too unless includeSubdomains is false), query
    strings dropped unless ignoreQueryParameters is false, `search` keeps the URLs that
    contain every one of its words. 408 when it takes longer than `timeout`."""
    source, url = check_map(guard, body)
    sitemap = body.sitemap or (
        "only" if body.sitemap_only else "skip" if body.ignore_sitemap else "include"
    )
    limit = min(body.limit or DEFAULT_MAP_LIMIT, MAX_MAP_LIMIT)
    budget = body.timeout / 1000.0 if body.timeout else DEFAULT_MAP_TIMEOUT_S
    scope = CrawlScope(
        [url],
        allow_subdomains=body.include_subdomains is not False,
        ignore_query=body.ignore_query_parameters is not False,
    )
    page: tuple[list[str], dict[str, Any]] = ([], {})
    from_sitemaps: list[str] = []
    try:
        async with asyncio.timeout(budget):
            async with asyncio.TaskGroup() as group:
                page_task = (
                    group.create_task(_page_links(fetcher, url, budget))
                    if sitemap != "only"
                    else None
                )
                sitemap_task = (
                    group.create_task(_sitemap_links(fetcher, url, budget))
                    if sitemap != "skip"
                    else None
                )
            if page_task is not None:
                page = page_task.result()
            if sitemap_task is not None:
                from_sitemaps = sitemap_task.result()
    except TimeoutError:
        raise UpstreamTimeout(f"map of {source[:200]} took longer than {budget:g} s") from None
    terms = _search_terms(body.search)
    links: dict[str, dict[str, Any]] = {}
    page_urls, info = page
    for candidate in [*page_urls, *from_sitemaps]:
        try:
            canonical = scope.canonicalize(candidate)
        except ValueError:
            continue
        host = urlsplit(canonical).hostname or ""
        if canonical in links or not scope.host_in_scope(host):
            continue
        if terms and not all(term in canonical.lower() for term in terms):
            continue
        links[canonical] = {"url": canonical}
        if len(links) >= limit:
            break
    root = next(iter(links.values()), None)
    if root is not None and page_urls and root["url"] == scope.canonicalize(page_urls[0]):
        root.update(_drop_none(info))
    return {"success": True, "links": list(links.values())}
