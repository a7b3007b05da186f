"""Scraper routes: submit a scrape job, preview one URL inline."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response, status

from app.api.deps import PrincipalDep, SessionDep, SettingsDep
from app.api.resources import FetcherDep, GuardDep
from app.api.routes.common import API_PREFIX, check_idempotency_key, job_location
from app.api.schemas import (
    CrawlCreate,
    JobPublic,
    JobSpecBase,
    PreviewCreate,
    PreviewPublic,
    ScrapeCreate,
)
from app.config import Settings
from app.scraper.ssrf import SSRFGuard
from app.services import admin, jobs, preview

router = APIRouter(prefix=API_PREFIX, tags=["scraper"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        description="Retry-safe submission: the same key and body return the same job "
        "(200, Idempotent-Replayed: true); the same key with another body is a 409",
    ),
]


# POST /scrape and POST /crawl answer alike: 202 + Location, or 200 for a replayed key
_SUBMIT_ROUTE: dict[str, Any] = {
    "status_code": status.HTTP_202_ACCEPTED,
    "response_model": JobPublic,
    "responses": {200: {"model": JobPublic, "description": "Idempotent replay: the same job"}},
}


@router.post("/scrape", **_SUBMIT_ROUTE)
async def submit_scrape(
    body: ScrapeCreate,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
    guard: GuardDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Accept up to 10,000 URLs; 202 once the job and its tasks are committed."""
    return await _submit(
        body, response, session, principal.tenant, guard, settings, idempotency_key
    )


@router.post("/crawl", **_SUBMIT_ROUTE)
async def submit_crawl(
    body: CrawlCreate,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
    guard: GuardDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Start a crawl from its seeds; 202 once the job and its seed tasks are committed."""
    return await _submit(
        body, response, session, principal.tenant, guard, settings, idempotency_key
    )


async def _submit(
    body: JobSpecBase,
    response: Response,
    session: SessionDep,
    tenant: str,
    guard: SSRFGuard,
    settings: Settings,
    idempotency_key: str | None,
) -> JobPublic:
    key = check_idempotency_key(idempotency_key)
    # a refused request (422) must not cost the tenant any of its rate allowance
    prepared = jobs.prepare_submission(body, guard, settings.default_retain_days)
    # the tenant's limits (429); the submission is one statement that commits by itself
    async with admin.admitted(session, settings, tenant, autocommit=True):
        job, created = await jobs.submit_job(
            session,
            tenant,
            body,
            guard=guard,
            idempotency_key=key,
            default_host_limit=settings.per_host_concurrency,
            default_retain_days=settings.default_retain_days,
            prepared=prepared,
        )
    response.headers["Location"] = job_location(job.id)
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.post("/scrape/preview", response_model=PreviewPublic)
async def scrape_preview(
    body: PreviewCreate,
    principal: PrincipalDep,
    fetcher: FetcherDep,
    guard: GuardDep,
    session: SessionDep,
    settings: SettingsDep,
) -> PreviewPublic:
    """Fetch and extract one URL now, within options.timeout_s; nothing is stored."""
    # counts against the tenant's submission rate (a fetch on its behalf), creates no job;
    # a refused request (422) does not
    preview.check(guard, body)
    await admin.check_rate(session, settings, principal.tenant)
    return await preview.preview(fetcher, guard, body)
