"""The Firecrawl-compatible API (/v1, /v2) over HTTP: real PostgreSQL, real local sites,
the real executor. The SDK itself is driven in tests/e2e/test_firecrawl_sdk.py."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from aiohttp import web

from app.database.connection import ConnectionManager
from app.main import create_app
from app.scraper.scope import CrawlScope
from app.scraper.ssrf import SSRFGuard
from app.services import firecrawl as fc
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.integration.conftest import Headers, bearer, make_key
from tests.support.crawl_site import CrawlSite
from tests.support.db_proxy import Proxy, proxied_url, upstream_opener
from tests.support.jobs import job_row, wait_terminal
from tests.support.served import ServedSite
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.timeout(60)

ARTICLE = """<!doctype html>
<html lang="en"><head><title>Tide tables</title>
<meta name="description" content="When the sea comes in">
<meta property="og:title" content="Tides"><link rel="icon" href="/favicon.ico">
</head><body>
<header><a href="/">Harbour home</a></header>
<nav><a href="/menu">Site menu</a></nav>
<main><h1>Tide tables</h1>
<p>High water at <b>06:12</b>, see <a href="/tides/tomorrow">tomorrow</a>.</p>
<ul><li>Neap</li><li>Spring</li></ul>
<table><tr><th>Port</th><th>Time</th></tr><tr><td>Brest</td><td>06:12</td></tr></table>
</main>
<aside>Sponsored</aside><footer>Copyright harbour</footer><script>track()</script>
</body></html>"""


class ArticleSite(ServedSite):
    """An article page with site furniture, a 404 page and a plain-text file."""

    def __init__(self) -> None:
        super().__init__()
        self.app.router.add_get("/article", self.article)
        self.app.router.add_get("/missing", self.missing)
        self.app.router.add_get("/notes.txt", self.notes)

    async def article(self, request: web.Request) -> web.Response:
        return web.Response(text=ARTICLE, content_type="text/html")

    async def missing(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="<h1>No such tide</h1>", content_type="text/html")

    async def notes(self, request: web.Request) -> web.Response:
        return web.Response(text="plain notes", content_type="text/plain")


@pytest.fixture
async def article_site() -> AsyncIterator[ArticleSite]:
    async with ArticleSite().serve() as site:
        yield site


@pytest.fixture
async def crawl_site() -> AsyncIterator[CrawlSite]:
    async with CrawlSite(sitemap=True).serve() as site:
        yield site


@pytest.fixture
async def executor(db_url: str) -> AsyncIterator[AsyncJobExecutor]:
    settings = make_settings(db_url, retry_base_s=0.05, worker_concurrency=16)
    worker_db = ConnectionManager(settings, application_name="trawler-worker")
    ex = AsyncJobExecutor(worker_db, settings)
    await ex.start()
    yield ex
    await ex.stop(grace=1.0)
    await worker_db.dispose()


def _path(url: str) -> str:
    return urlsplit(url).path


async def _start_crawl(
    client: httpx.AsyncClient, headers: Headers, body: dict[str, Any], api: str = "v2"
) -> str:
    response = await client.post(f"/{api}/crawl", json=body, headers=headers)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["success"] is True
    assert isinstance(answer["id"], str) and isinstance(answer["url"], str)
    assert answer["url"] == f"http://trawler.test/{api}/crawl/{answer['id']}"
    return str(answer["id"])


async def _all_documents(
    client: httpx.AsyncClient, headers: Headers, first: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Follows `next` from `first`; returns (documents, every status answer)."""
    answers: list[dict[str, Any]] = []
    url: str | None = first
    while url is not None:
        response = await client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        answers.append(response.json())
        url = answers[-1].get("next")
        assert len(answers) < 50, "next never ends"
    return [doc for answer in answers for doc in answer["data"]], answers


def _check_status_shape(answer: dict[str, Any]) -> None:
    assert answer["success"] is True
    assert answer["status"] in {"scraping", "completed", "failed", "cancelled"}
    for key in ("completed", "total", "creditsUsed"):
        assert type(answer[key]) is int, (key, answer[key])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", answer["expiresAt"])


# --------------------------------------------------------------------------------------
# Scrape (inline)


async def test_scrape_serves_markdown_html_raw_html_links_and_metadata(
    client: httpx.AsyncClient, auth_headers: Headers, article_site: ArticleSite
) -> None:
    url = article_site.url("/article")
    body = {"url": url, "formats": ["markdown", "html", "rawHtml", "links"], "origin": "x"}
    response = await client.post("/v2/scrape", json=body, headers=auth_headers)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["success"] is True
    doc = answer["data"]
    # onlyMainContent (Firecrawl's default): the article, not the site furniture
    markdown = doc["markdown"]
    assert markdown.startswith("# Tide tables")
    assert "High water at **06:12**" in markdown
    assert f"[tomorrow]({article_site.url('/tides/tomorrow')})" in markdown
    assert "- Neap\n- Spring" in markdown
    assert "| Brest | 06:12 |" in markdown
    for furniture in ("Harbour home", "Site menu", "Sponsored", "Copyright", "track()"):
        assert furniture not in markdown
    assert doc["html"].startswith("<main>") and "Site menu" not in doc["html"]
    assert doc["rawHtml"] == ARTICLE
    assert doc["links"] == [
        article_site.url("/"),
        article_site.url("/menu"),
        article_site.url("/tides/tomorrow"),
    ]
    meta = doc["metadata"]
    assert meta["sourceURL"] == url and meta["url"] == url
    assert meta["statusCode"] == 200
    assert meta["contentType"].startswith("text/html")
    assert meta["title"] == "Tide tables"
    assert meta["description"] == "When the sea comes in"
    assert meta["language"] == "en"
    assert meta["ogTitle"] == "Tides"
    assert meta["favicon"] == article_site.url("/favicon.ico")
    assert None not in meta.values()
    assert "error" not in meta

    whole = await client.post(
        "/v1/scrape",
        json={"url": url, "onlyMainContent": False, "formats": ["markdown"]},
        headers=auth_headers,
    )
    assert whole.status_code == 200, whole.text
    doc = whole.json()["data"]
    assert set(doc) == {"markdown", "metadata"}  # only what was asked (metadata always)
    assert "Site menu" in doc["markdown"] and "Copyright harbour" in doc["markdown"]
    assert "track()" not in doc["markdown"]


async def test_scrape_of_error_pages_and_text(
    client: httpx.AsyncClient, auth_headers: Headers, article_site: ArticleSite
) -> None:
    missing = await client.post(
        "/v2/scrape", json={"url": article_site.url("/missing")}, headers=auth_headers
    )
    assert missing.status_code == 200, missing.text
    doc = missing.json()["data"]
    assert doc["markdown"] == "# No such tide"
    assert doc["metadata"]["statusCode"] == 404
    assert doc["metadata"]["error"] == "HTTP 404"

    text = await client.post(
        "/v2/scrape", json={"url": article_site.url("/notes.txt")}, headers=auth_headers
    )
    assert text.json()["data"]["markdown"] == "plain notes"

    # nothing listens there: the target's failure is the answer's status
    closed = await client.post(
        "/v2/scrape", json={"url": "http://127.0.0.1:9/"}, headers=auth_headers
    )
    assert closed.status_code == 502, closed.text
    assert closed.json()["success"] is False
    assert "127.0.0.1:9" in closed.json()["error"]


async def test_unsupported_formats_are_reported_unknown_ones_refused(
    client: httpx.AsyncClient, auth_headers: Headers, article_site: ArticleSite
) -> None:
    url = article_site.url("/article")
    response = await client.post(
        "/v2/scrape",
        json={"url": url, "formats": [{"type": "markdown"}, "screenshot", {"type": "summary"}]},
        headers=auth_headers,
    )
    assert response.status_code == 200, response.text
    doc = response.json()["data"]
    assert doc["markdown"].startswith("# Tide tables")
    assert "screenshot, summary" in doc["warning"]
    bad = await client.post(
        "/v2/scrape", json={"url": url, "formats": ["markdwon"]}, headers=auth_headers
    )
    assert bad.status_code == 400
    assert bad.json() == {"success": False, "error": "formats: unknown format 'markdwon'"}


# --------------------------------------------------------------------------------------
# Errors: Firecrawl's shape with the real status


async def test_errors_have_firecrawl_shape_and_real_status(
    client: httpx.AsyncClient, auth_headers: Headers, other_headers: Headers
) -> None:
    cases: list[tuple[str, str, dict[str, Any] | None, Headers, int]] = [
        ("POST", "/v2/crawl", {"url": "http://127.0.0.1:1/"}, {}, 401),
        ("POST", "/v2/crawl", {"limit": 3}, auth_headers, 400),
        ("POST", "/v2/crawl", {"url": "ftp://x.example/"}, auth_headers, 400),
        ("POST", "/v2/crawl", {"url": "http://a.example/", "limit": 0}, auth_headers, 400),
        (
            "POST",
            "/v2/crawl",
            {"url": "http://a.example/", "includePaths": ["("]},
            auth_headers,
            400,
        ),
        ("POST", "/v2/crawl", {"url": "http://a.example/", "delay": 61}, auth_headers, 400),
        ("POST", "/v2/batch/scrape", {"urls": []}, auth_headers, 400),
        ("POST", "/v2/batch/scrape", {"urls": ["http://"]}, auth_headers, 400),
        ("GET", f"/v2/crawl/{uuid.uuid4()}", None, auth_headers, 404),
        ("GET", "/v2/crawl/not-a-job", None, auth_headers, 404),
        ("GET", "/v2/crawl/x?skip=-1", None, auth_headers, 400),
        ("GET", "/v2/crawl/x?skip=99999999999999999999", None, auth_headers, 400),
        ("DELETE", f"/v2/batch/scrape/{uuid.uuid4()}", None, auth_headers, 404),
        ("POST", "/v2/search", {"query": "tides"}, auth_headers, 404),
        ("GET", "/v1/extract/1", None, auth_headers, 404),
    ]
    for method, path, body, headers, status in cases:
        response = await client.request(method, path, json=body, headers=headers)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"] == "application/json"
        answer = response.json()
        assert answer["success"] is False and isinstance(answer["error"], str), answer
    missing_url = await client.post("/v2/crawl", json={"limit": 3}, headers=auth_headers)
    assert missing_url.json()["error"] == "url: Field required"
    # tenants apply: another tenant's crawl is not found
    job_id = await _start_crawl(client, auth_headers, {"url": "http://a.example/"})
    other = await client.get(f"/v2/crawl/{job_id}", headers=other_headers)
    assert other.status_code == 404 and other.json()["success"] is False
    gone = await client.delete(f"/v2/crawl/{job_id}", headers=other_headers)
    assert gone.status_code == 404
    # a crawl is not a batch scrape
    assert (await client.get(f"/v2/batch/scrape/{job_id}", headers=auth_headers)).status_code == 404


async def test_idempotency_key(client: httpx.AsyncClient, auth_headers: Headers) -> None:
    body = {"url": "http://a.example/", "limit": 3}
    headers = {**auth_headers, "x-idempotency-key": "crawl-1"}
    first = await _start_crawl(client, headers, body)
    assert await _start_crawl(client, headers, body) == first
    other = await client.post("/v2/crawl", json={**body, "limit": 4}, headers=headers)
    assert other.status_code == 409 and other.json()["success"] is False
    assert await _start_crawl(client, auth_headers, body) != first  # no key: a new crawl


async def test_ssrf_guard_applies(guarded_client: httpx.AsyncClient, db: ConnectionManager) -> None:
    headers = bearer(await make_key(db, "guarded"))
    for method, path, body in [
        ("POST", "/v2/crawl", {"url": "http://127.0.0.1:8080/"}),
        ("POST", "/v1/crawl", {"url": "http://169.254.169.254/latest"}),
        ("POST", "/v2/scrape", {"url": "http://localhost/"}),
        ("POST", "/v2/batch/scrape", {"urls": ["http://10.0.0.1/"]}),
        ("POST", "/v2/map", {"url": "http://[::1]/"}),
    ]:
        response = await guarded_client.request(method, path, json=body, headers=headers)
        assert response.status_code == 403, (path, response.text)
        assert "not allowed" in response.json()["error"]
    # with ignoreInvalidURLs the refused ones are listed instead
    response = await guarded_client.post(
        "/v2/batch/scrape",
        json={"urls": ["http://10.0.0.1/", "https://example.com/"], "ignoreInvalidURLs": True},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["invalidURLs"] == ["http://10.0.0.1/"]


async def test_database_outage_is_a_fast_503(db_url: str, pg_server: str) -> None:
    proxy = Proxy(upstream_opener(pg_server))
    await proxy.start()
    settings = make_settings(proxied_url(db_url, proxy.port), pool_timeout=1.0)
    application = create_app(settings, migrate=False)
    try:
        async with application.router.lifespan_context(application):
            headers = bearer(await make_key(application.state.db, "outage"))
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://trawler.test"
            ) as client:
                job_id = await _start_crawl(client, headers, {"url": "http://a.example/"})
                await proxy.cut("refuse")
                started = time.monotonic()
                response = await client.get(f"/v2/crawl/{job_id}", headers=headers)
                elapsed = time.monotonic() - started
    finally:
        await proxy.close()
    assert response.status_code == 503, response.text
    assert response.json()["success"] is False
    assert response.headers["retry-after"]
    assert elapsed < 5


# --------------------------------------------------------------------------------------
# Crawl


async def test_crawl_pages_through_documents_with_absolute_next(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    crawl_site: CrawlSite,
    executor: AsyncJobExecutor,
) -> None:
    job_id = await _start_crawl(
        client,
        auth_headers,
        {
            "url": crawl_site.url("/"),
            "limit": 8,
            "scrapeOptions": {"formats": ["markdown", "links"]},
            "zeroDataRetention": False,  # unknown to Trawler: ignored
        },
    )
    await wait_terminal(db, uuid.UUID(job_id))
    docs, answers = await _all_documents(client, auth_headers, f"/v2/crawl/{job_id}?limit=3")
    for answer in answers:
        _check_status_shape(answer)
        assert answer["status"] == "completed"
    first = answers[0]
    assert first["total"] == 8  # limit: exactly 8 URLs taken into the crawl
    assert first["completed"] == first["creditsUsed"] == len(docs)
    assert [len(a["data"]) for a in answers] == [3, 3, len(docs) - 6]
    assert first["next"] == f"http://trawler.test/v2/crawl/{job_id}?limit=3&skip=3"
    assert "next" not in answers[-1]
    sources = [doc["metadata"]["sourceURL"] for doc in docs]
    assert len(set(sources)) == len(sources), "every page once"
    assert set(sources) <= crawl_site.expected_pages(3) | {crawl_site.url("/orphan")}
    for doc in docs:
        assert set(doc) == {"markdown", "links", "metadata"}
        title = _path(doc["metadata"]["sourceURL"]).strip("/") or "home"
        assert doc["markdown"].startswith(f"# {title}"), doc["markdown"]
        assert doc["metadata"]["title"] == title
        assert doc["metadata"]["statusCode"] == 200
        assert all(link.startswith("http") for link in doc["links"])
    # without a limit parameter all of them come in one page
    whole = (await client.get(f"/v2/crawl/{job_id}", headers=auth_headers)).json()
    assert [d["metadata"]["sourceURL"] for d in whole["data"]] == sources
    assert "next" not in whole
    # skip past the end: an empty last page
    past = (await client.get(f"/v2/crawl/{job_id}?skip=100", headers=auth_headers)).json()
    assert past["data"] == [] and "next" not in past


async def test_crawl_options_map_onto_the_crawl(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    crawl_site: CrawlSite,
    executor: AsyncJobExecutor,
) -> None:
    site = crawl_site
    bodies = {
        # Firecrawl path regexes: ^ is the start of the path, $ its end
        "paths": {
            "url": site.url("/"),
            "includePaths": ["^/cat/"],
            "excludePaths": ["/2$"],
            "maxDiscoveryDepth": 1,
            "sitemap": "skip",
        },
        # without crawlEntireDomain only URLs under the start path
        "below": {"url": site.url("/cat/0"), "maxDiscoveryDepth": 1, "sitemap": "skip"},
        "entire": {
            "url": site.url("/cat/0"),
            "maxDiscoveryDepth": 1,
            "crawlEntireDomain": True,
            "sitemap": "skip",
        },
        "robots": {"url": site.url("/"), "maxDiscoveryDepth": 1, "ignoreRobotsTxt": True},
        "sitemap": {"url": site.url("/"), "maxDiscoveryDepth": 1, "includePaths": ["^/orphan$"]},
    }
    ids = {name: await _start_crawl(client, auth_headers, body) for name, body in bodies.items()}
    ids["v1"] = await _start_crawl(
        client, auth_headers, {"url": site.url("/"), "maxDepth": 2, "ignoreSitemap": True}, "v1"
    )
    pages: dict[str, set[str]] = {}
    for name, job_id in ids.items():
        row = await wait_terminal(db, uuid.UUID(job_id))
        assert row["status"] == "completed", (name, row)
        docs, _ = await _all_documents(client, auth_headers, f"/v2/crawl/{job_id}")
        pages[name] = {_path(doc["metadata"]["sourceURL"]) for doc in docs}
    cats = {"/cat/0", "/cat/1", "/cat/2"}
    assert pages["paths"] == {"/", "/cat/0", "/cat/1"}
    assert pages["below"] == {"/cat/0"}
    assert pages["entire"] == {"/cat/0", "/"} | {f"/item/0-{i}" for i in range(5)}
    assert pages["robots"] == {"/", "/private/secret", "/calendar/2024/1", "/orphan"} | cats
    # sitemap URLs come in even where links do not lead (sitemap: "include" by default)
    assert pages["sitemap"] == {"/", "/orphan"}
    # v1 maxDepth counts path segments (link hops are not limited): no /calendar/2024/1
    assert pages["v1"] == {"/"} | cats | {f"/item/{c}-{i}" for c in range(3) for i in range(5)}

    # robots.txt kept /private/secret out of the crawl that honours it
    errors = await client.get(f"/v2/crawl/{ids['paths']}/errors", headers=auth_headers)
    assert errors.json() == {"errors": [], "robotsBlocked": []}  # not under ^/cat/
    robots = await _start_crawl(
        client, auth_headers, {"url": site.url("/"), "maxDiscoveryDepth": 1, "sitemap": "skip"}
    )
    await wait_terminal(db, uuid.UUID(robots))
    errors = await client.get(f"/v1/crawl/{robots}/errors", headers=auth_headers)
    assert errors.json()["robotsBlocked"] == [site.url("/private/secret")]


def test_path_patterns_match_firecrawl_semantics() -> None:
    cases = [
        ("^/blog/", "https://x.example/blog/a", True),
        ("^/blog/", "https://x.example/en/blog/a", False),
        ("blog", "https://x.example/en/blog/a", True),
        ("blog", "https://blog.example/a", False),  # the host is not the path
        ("blog", "https://x.example/a?tag=blog", False),  # nor is the query
        (r"\.pdf$", "https://x.example/a.pdf?dl=1", True),
        (r"\.pdf$", "https://x.example/a.pdf.html", False),
        ("^/a$|^/b", "https://x.example/b/c", True),
        ("^/a$|^/b", "https://x.example/a/c", False),
        ("^/$", "https://x.example/", True),
        ("[|]x", "https://x.example/|x", True),
    ]
    for pattern, url, expected in cases:
        translated = fc.path_pattern(pattern, field="includePaths")
        assert (re.search(translated, url) is not None) is expected, (pattern, url)


def test_crawl_options_become_the_crawl_spec() -> None:
    guard = SSRFGuard(allow_private=True)
    body = fc.CrawlIn.model_validate(
        {
            "url": "example.com/docs/",
            "limit": 50,
            "maxDiscoveryDepth": 2,
            "allowExternalLinks": True,
            "allowSubdomains": True,
            "ignoreQueryParameters": True,
            "ignoreRobotsTxt": True,
            "delay": 1.5,
            "maxConcurrency": 500,
            "webhook": {"url": "https://hooks.example/fc", "events": ["completed"]},
            "scrapeOptions": {"formats": ["rawHtml", "html"], "onlyMainContent": False},
        }
    )
    spec = fc.crawl_request(body, guard, "v2").stored_spec()
    assert spec["seeds"] == ["http://example.com/docs/"]
    follow, politeness = spec["follow"], spec["politeness"]
    assert follow["max_pages"] == 50 and follow["max_depth"] == 2
    assert follow["same_site"] is False and follow["allow_subdomains"] is True
    assert follow["ignore_query"] is True and follow["sitemaps"] is True
    assert politeness == {"respect_robots": False, "per_host_concurrency": 1, "delay_ms": 1500}
    assert spec["extract"] == {
        "rawHtml": {
            "builtin": "raw_html",
            "css": None,
            "xpath": None,
            "value": "text",
            "all": False,
        },
        "html": {"builtin": "html", "css": None, "xpath": None, "value": "text", "all": False},
        "metadata": {
            "builtin": "metadata",
            "css": None,
            "xpath": None,
            "value": "text",
            "all": False,
        },
    }
    assert spec["firecrawl"]["webhook"] == {
        "url": "https://hooks.example/fc",
        "events": ["completed"],
    }
    # below the start path unless crawlEntireDomain
    scope = CrawlScope(spec["seeds"], include=follow["include"], exclude=follow["exclude"])
    assert scope.admits("http://example.com/docs/a", 1) is None
    assert scope.admits("http://example.com/pricing", 1) is not None
    # defaults: Firecrawl's limit, no depth bound to speak of, sitemaps on
    plain = fc.crawl_request(fc.CrawlIn(url="https://example.com/"), guard, "v2").stored_spec()
    assert plain["follow"]["max_pages"] == fc.DEFAULT_CRAWL_LIMIT
    assert plain["follow"]["max_depth"] == fc.MAX_LINK_DEPTH
    assert plain["follow"]["include"] == [] and plain["follow"]["exclude"] == []
    assert plain["politeness"]["respect_robots"] is True
    assert set(plain["extract"]) == {"markdown", "metadata"}
    assert plain["extract"]["markdown"]["builtin"] == "markdown_main"


async def test_cancel_and_active_crawls(
    client: httpx.AsyncClient, auth_headers: Headers, other_headers: Headers
) -> None:
    # no executor runs: the crawls stay queued
    first = await _start_crawl(client, auth_headers, {"url": "http://a.example/", "limit": 5})
    second = await _start_crawl(client, auth_headers, {"url": "http://b.example/"}, "v1")
    active = (await client.get("/v2/crawl/active", headers=auth_headers)).json()
    assert active["success"] is True
    assert [(c["id"], c["teamId"], c["url"]) for c in active["crawls"]] == [
        (second, "tenant-a", "http://b.example/"),
        (first, "tenant-a", "http://a.example/"),
    ]
    assert active["crawls"][1]["options"]["limit"] == 5
    assert (await client.get("/v2/crawl/active", headers=other_headers)).json()["crawls"] == []

    status = (await client.get(f"/v2/crawl/{first}", headers=auth_headers)).json()
    _check_status_shape(status)
    assert status["status"] == "scraping" and status["data"] == []
    # a running crawl's last page points at itself (the SDKs stop on that)
    assert status["next"] == f"http://trawler.test/v2/crawl/{first}?skip=0"

    for path in (f"/v2/crawl/{first}", f"/v1/crawl/{second}", f"/v2/crawl/{first}"):
        response = await client.delete(path, headers=auth_headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"success": True, "status": "cancelled"}
    status = (await client.get(f"/v1/crawl/{first}", headers=auth_headers)).json()
    assert status["status"] == "cancelled" and "next" not in status
    assert (await client.get("/v2/crawl/active", headers=auth_headers)).json()["crawls"] == []


# --------------------------------------------------------------------------------------
# Batch scrape and map


async def test_batch_scrape(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    article_site: ArticleSite,
    executor: AsyncJobExecutor,
) -> None:
    article, missing = article_site.url("/article"), article_site.url("/missing")
    response = await client.post(
        "/v2/batch/scrape",
        json={
            "urls": [article, missing, "http://", "mailto:x@y.example"],
            "ignoreInvalidURLs": True,
            "formats": ["markdown", "rawHtml"],
            "onlyMainContent": True,
        },
        headers=auth_headers,
    )
    assert response.status_code == 200, response.text
    started = response.json()
    assert started["invalidURLs"] == ["http://", "mailto:x@y.example"]
    job_id = started["id"]
    assert started["url"] == f"http://trawler.test/v2/batch/scrape/{job_id}"
    assert (await wait_terminal(db, uuid.UUID(job_id)))["status"] == "completed"

    answer = (await client.get(f"/v2/batch/scrape/{job_id}", headers=auth_headers)).json()
    _check_status_shape(answer)
    assert (answer["status"], answer["completed"], answer["total"]) == ("completed", 1, 2)
    [doc] = answer["data"]
    assert doc["markdown"].startswith("# Tide tables") and doc["rawHtml"] == ARTICLE
    errors = (await client.get(f"/v2/batch/scrape/{job_id}/errors", headers=auth_headers)).json()
    [error] = errors["errors"]
    assert (error["url"], error["code"], error["error"]) == (missing, "HTTP_404", "HTTP 404")
    # a finished job cannot be cancelled (the SDK reads the 409 as "not cancelled")
    late = await client.delete(f"/v2/batch/scrape/{job_id}", headers=auth_headers)
    assert late.status_code == 409 and late.json()["success"] is False
    # only asked-for formats were stored (rawHtml is big)
    row = await job_row(db, uuid.UUID(job_id))
    assert set(row["spec"]["extract"]) == {"markdown", "rawHtml", "metadata"}


async def test_map(client: httpx.AsyncClient, auth_headers: Headers, crawl_site: CrawlSite) -> None:
    site = crawl_site

    async def links(**body: Any) -> list[dict[str, Any]]:
        response = await client.post(
            "/v2/map", json={"url": site.url("/"), **body}, headers=auth_headers
        )
        assert response.status_code == 200, response.text
        assert response.json()["success"] is True
        return list(response.json()["links"])

    found = await links()
    urls = [link["url"] for link in found]
    assert found[0] == {"url": site.url("/"), "title": "home"}
    assert site.url("/orphan") in urls  # only the sitemap knows it
    assert {site.url(f"/cat/{c}") for c in range(3)} <= set(urls)
    assert not any("elsewhere.example" in u or u.startswith("mailto") for u in urls)
    assert len(urls) == len(set(urls))
    assert site.url("/orphan") not in [link["url"] for link in await links(sitemap="skip")]
    assert [link["url"] for link in await links(sitemap="only")] == [
        site.url("/orphan"),
        site.url("/cat/0"),
    ]
    assert {link["url"] for link in await links(search="cat")} == {
        site.url(f"/cat/{c}") for c in range(3)
    }
    assert len(await links(limit=2)) == 2


async def test_status_paging_while_the_crawl_runs(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    executor: AsyncJobExecutor,
) -> None:
    async with CrawlSite(categories=2, items=3, delay=0.2).serve() as site:
        job_id = await _start_crawl(
            client, auth_headers, {"url": site.url("/"), "sitemap": "skip", "maxDiscoveryDepth": 2}
        )
        seen: list[str] = []
        skip_url = f"/v2/crawl/{job_id}?limit=2"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = (await client.get(skip_url, headers=auth_headers)).json()
            seen += [doc["metadata"]["sourceURL"] for doc in answer["data"]]
            if answer["status"] == "completed" and "next" not in answer:
                break
            assert "next" in answer  # a running crawl always has one
            skip_url = answer["next"]
            if not answer["data"]:
                await asyncio.sleep(0.1)
        row = await job_row(db, uuid.UUID(job_id))
    assert row["status"] == "completed"
    assert len(seen) == len(set(seen)) == row["succeeded"] > 2
    assert parse_qs(urlsplit(skip_url).query)["limit"] == ["2"]  # kept by every next


async def test_crawl_webhook_is_delivered_with_mapped_events(
    db_url: str, client: httpx.AsyncClient, auth_headers: Headers
) -> None:
    settings = make_settings(db_url, webhook_poll_interval=0.1, worker_concurrency=8)
    worker_db = ConnectionManager(settings, application_name="trawler-worker")
    ex = AsyncJobExecutor(worker_db, settings)
    async with CrawlSite(categories=1, items=1).serve() as site, WebhookReceiver().serve() as hook:
        body = {
            "url": site.url("/"),
            "limit": 3,
            "webhook": {
                "url": hook.hook_url,
                "headers": {"X-Team": "blue"},
                "metadata": {"run": 7},
                "events": ["started", "completed"],
            },
        }
        job_id = await _start_crawl(client, auth_headers, body)
        await ex.start()
        try:
            await hook.wait_for(lambda r: r.accepted("job.completed"))
        finally:
            await ex.stop(grace=1.0)
            await worker_db.dispose()
    events = [r.event for r in hook.accepted()]
    assert events == ["job.started", "job.completed"], events
    done = hook.accepted("job.completed")[0]
    assert done.headers["X-Team"] == "blue"
    assert done.json["job"]["id"] == job_id
    status = (await client.get(f"/v2/crawl/{job_id}", headers=auth_headers)).json()
    assert status["status"] == "completed" and status["completed"] == 3
    wrong = {**body, "webhook": {"url": hook.hook_url, "events": ["finished"]}}
    response = await client.post("/v2/crawl", json=wrong, headers=auth_headers)
    assert response.status_code == 400 and "webhook.events" in response.json()["error"]
