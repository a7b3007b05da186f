"""Firecrawl-compatible routes at /v1 and /v2, so Firecrawl clients work against Trawler.

The Firecrawl SDKs drop any path prefix of their base URL, hence the root mount. Answers
and errors have Firecrawl's shapes ({"success": false, "error": ...} with the real status
code), not problem+json; the keys are Trawler API keys and tenants apply as everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import DbDep, PrincipalDep, SessionDep, SettingsDep
from app.api.errors import (
    UNSTORABLE_TEXT,
    TrawlerError,
    allowed_methods,
    is_unstorable_text,
    unavailable_detail,
)
from app.api.resources import FetcherDep, GuardDep
from app.api.routes.common import check_idempotency_key
from app.database.connection import UNAVAILABLE_ERRORS, is_unavailable
from app.database.models import JobKind
from app.services import admin, jobs
from app.services import firecrawl as fc

logger = logging.getLogger(__name__)

_DB_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, sa_exc.DBAPIError)


def answer(
    body: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_UTC_Z),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def error_answer(status_code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return answer({"success": False, "error": message}, status_code, headers)


class FirecrawlRoute(APIRoute):
    """Renders every failure of the route (auth, validation, domain, database) the
    Firecrawl way. Invalid input is a 400 there, so Trawler's 422s become 400s."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except TrawlerError as error:
                status_code = 400 if error.status == 422 else error.status
                return error_answer(status_code, error.detail, error.headers)
            except RequestValidationError as error:
                return error_answer(400, fc.validation_summary(error.errors()))
            except StarletteHTTPException as error:
                return error_answer(error.status_code, str(error.detail), dict(error.headers or {}))
            except _DB_ERRORS as error:
                if is_unstorable_text(error):
                    return error_answer(400, UNSTORABLE_TEXT)
                if not is_unavailable(error):
                    logger.exception("database error on %s", request.url.path)
                    return error_answer(500, "internal error")
                detail, retry_after = unavailable_detail(error)
                logger.warning("%s %s: %s (%s)", request.method, request.url.path, detail, error)
                return error_answer(503, detail, {"Retry-After": str(retry_after)})

        return handle


router = APIRouter(tags=["firecrawl"], route_class=FirecrawlRoute)

IdempotencyHeader = Annotated[str | None, Header(alias="x-idempotency-key")]
IdempotencyKeyHeader = Annotated[str | None, Header(alias="idempotency-key")]
Skip = Annotated[int, Query(ge=0, le=1_000_000_000, description="documents to skip")]
Limit = Annotated[int | None, Query(ge=1, description="documents per page (at most 1000)")]


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _submit(
    request: fc.CompatCrawl | fc.CompatScrape,
    session: SessionDep,
    tenant: str,
    guard: GuardDep,
    settings: SettingsDep,
    key: str | None,
) -> str:
    idempotency_key = check_idempotency_key(key)
    # a refused request (400) must not cost the tenant any of its rate allowance
    prepared = jobs.prepare_submission(request, guard, settings.default_retain_days)
    # the tenant's limits (429); the submission is one statement that commits by itself
    async with admin.admitted(session, settings, tenant, autocommit=True):
        job = await fc.submit(
            session,
            tenant,
            request,
            guard=guard,
            idempotency_key=idempotency_key,
            default_host_limit=settings.per_host_concurrency,
            default_retain_days=settings.default_retain_days,
            prepared=prepared,
        )
    return str(job.id)


def _status_answer(request: Request, page: fc.StatusPage) -> Response:
    body = page.body
    if page.next_skip is not None:
        body["next"] = str(request.url.include_query_params(skip=page.next_skip))
    return answer(body)


# --------------------------------------------------------------------------------------
# Crawl


async def _start_crawl(
    api: fc.Api,
    body: fc.CrawlIn,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    guard: GuardDep,
    settings: SettingsDep,
    key: str | None,
) -> Response:
    job_id = await _submit(
        fc.crawl_request(body, guard, api), session, principal.tenant, guard, settings, key
    )
    return answer({"success": True, "id": job_id, "url": f"{_base(request)}/{api}/crawl/{job_id}"})


@router.post("/v2/crawl", response_model=None)
@router.post("/v1/crawl", response_model=None)
async def crawl(
    body: fc.CrawlIn,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    guard: GuardDep,
    settings: SettingsDep,
    x_key: IdempotencyHeader = None,
    key: IdempotencyKeyHeader = None,
) -> Response:
    """Start a crawl: {success, id, url} (v1 options: maxDepth counts path segments)."""
    api: fc.Api = "v1" if request.url.path.startswith("/v1/") else "v2"
    return await _start_crawl(api, body, request, session, principal, guard, settings, x_key or key)


@router.get("/v2/crawl/active", response_model=None)
async def active_crawls(session: SessionDep, principal: PrincipalDep) -> Response:
    """The tenant's queued and running crawls."""
    return answer(await fc.active_crawls(session, principal.tenant))


@router.get("/v2/crawl/{job_id}", response_model=None)
@router.get("/v1/crawl/{job_id}", response_model=None)
async def crawl_status(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    skip: Skip = 0,
    limit: Limit = None,
) -> Response:
    """Progress and one page of documents; `next` (absolute) until the last page."""
    page = await fc.status_page(
        session, principal.tenant, fc.job_id_or_404(job_id), JobKind.crawl, skip=skip, limit=limit
    )
    return _status_answer(request, page)


@router.delete("/v2/crawl/{job_id}", response_model=None)
@router.delete("/v1/crawl/{job_id}", response_model=None)
async def cancel_crawl(job_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """Cancel a crawl: {success, status: "cancelled"}; 409 once it finished."""
    status = await fc.cancel(session, principal.tenant, fc.job_id_or_404(job_id), JobKind.crawl)
    return answer({"success": True, "status": status})


@router.get("/v2/crawl/{job_id}/errors", response_model=None)
@router.get("/v1/crawl/{job_id}/errors", response_model=None)
async def crawl_errors(job_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """Failed pages and the URLs robots.txt disallowed."""
    body = await fc.errors(session, principal.tenant, fc.job_id_or_404(job_id), JobKind.crawl)
    return answer(body)


# --------------------------------------------------------------------------------------
# Scrape, batch scrape, map


async def _check_rate(db: DbDep, settings: SettingsDep, tenant: str) -> None:
    """An inline fetch counts against the tenant's submission rate. A unit of work of its
    own: no pooled connection stays held while the target takes its time."""
    async with db.session() as session:
        await admin.check_rate(session, settings, tenant)


@router.post("/v2/scrape", response_model=None)
@router.post("/v1/scrape", response_model=None)
async def scrape(
    body: fc.ScrapeIn,
    db: DbDep,
    principal: PrincipalDep,
    fetcher: FetcherDep,
    guard: GuardDep,
    settings: SettingsDep,
) -> Response:
    """Fetch one URL now and answer its document (nothing is stored)."""
    fc.check_scrape(guard, body)  # refused (400, 403) before it counts against the rate
    await _check_rate(db, settings, principal.tenant)
    return answer(await fc.scrape(fetcher, guard, body))


@router.post("/v2/batch/scrape", response_model=None)
async def batch_scrape(
    body: fc.BatchScrapeIn,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    guard: GuardDep,
    settings: SettingsDep,
    x_key: IdempotencyHeader = None,
    key: IdempotencyKeyHeader = None,
) -> Response:
    """Start a batch scrape: {success, id, url, invalidURLs}."""
    batch = fc.batch_request(body, guard, "v2")
    job_id = await _submit(batch.request, session, principal.tenant, guard, settings, x_key or key)
    return answer(
        {
            "success": True,
            "id": job_id,
            "url": f"{_base(request)}/v2/batch/scrape/{job_id}",
            "invalidURLs": batch.invalid_urls,
        }
    )


@router.get("/v2/batch/scrape/{job_id}", response_model=None)
async def batch_status(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    skip: Skip = 0,
    limit: Limit = None,
) -> Response:
    """Progress and one page of documents, as for crawls."""
    page = await fc.status_page(
        session, principal.tenant, fc.job_id_or_404(job_id), JobKind.scrape, skip=skip, limit=limit
    )
    return _status_answer(request, page)


@router.delete("/v2/batch/scrape/{job_id}", response_model=None)
async def cancel_batch(job_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """Cancel a batch scrape; 409 once it finished."""
    status = await fc.cancel(session, principal.tenant, fc.job_id_or_404(job_id), JobKind.scrape)
    return answer({"success": True, "status": status})


@router.get("/v2/batch/scrape/{job_id}/errors", response_model=None)
async def batch_errors(job_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """Failed pages of a batch scrape."""
    body = await fc.errors(session, principal.tenant, fc.job_id_or_404(job_id), JobKind.scrape)
    return answer(body)


@router.post("/v2/map", response_model=None)
async def map_site(
    body: fc.MapIn,
    db: DbDep,
    principal: PrincipalDep,
    fetcher: FetcherDep,
    guard: GuardDep,
    settings: SettingsDep,
) -> Response:
    """The site's URLs from its sitemaps and the page's links: {success, links}."""
    fc.check_map(guard, body)  # refused (400, 403) before it counts against the rate
    await _check_rate(db, settings, principal.tenant)
    return answer(await fc.map_site(fetcher, guard, body))


# Last: whatever else a Firecrawl client asks for (search, extract, agent, ...) gets a
# Firecrawl-shaped 404 that says so, instead of a problem+json the SDKs cannot read.
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@router.api_route("/v1/{rest:path}", methods=_METHODS, include_in_schema=False)
@router.api_route("/v2/{rest:path}", methods=_METHODS, include_in_schema=False)
async def not_implemented(request: Request) -> Response:
    allowed = allowed_methods(request)
    if allowed is not None:  # a route of the API, asked with another method
        return error_answer(
            405, f"{request.method} is not allowed here; use {allowed}", {"Allow": allowed}
        )
    return error_answer(
        404,
        f"{request.method} {request.url.path} is not part of Trawler's Firecrawl-compatible "
        "API (crawl, scrape, batch scrape and map are)",
    )
