"""Scraper routes: submit a scrape job, preview one URL inline."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response, status

from app.api.deps import DbDep, PrincipalDep, SessionDep, SettingsDep
from app.api.resources import FetcherDep, GuardDep, TaskWakerDep
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
from app.database.connection import ConnectionManager
from app.scraper.ssrf import SSRFGuard
from app.services import admin, jobs, preview
from app.services.wakeups import TaskWaker

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
    db: DbDep,
    principal: PrincipalDep,
    guard: GuardDep,
    waker: TaskWakerDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Accept up to 10,000 URLs; 202 once the job and its tasks are committed."""
    job, created = await submit(db, settings, guard, waker, principal.tenant, body, idempotency_key)
    return _answered(response, job, created)


@router.post("/crawl", **_SUBMIT_ROUTE)
async def submit_crawl(
    body: CrawlCreate,
    response: Response,
    db: DbDep,
    principal: PrincipalDep,
    guard: GuardDep,
    waker: TaskWakerDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Start a crawl from its seeds; 202 once the job and its seed tasks are committed."""
    job, created = await submit(db, settings, guard, waker, principal.tenant, body, idempotency_key)
    return _answered(response, job, created)


# the request models of the submission routes, by path (HotPathMiddleware reads it)
SUBMIT_MODELS: dict[str, type[JobSpecBase]] = {
    f"{API_PREFIX}/scrape": ScrapeCreate,
    f"{API_PREFIX}/crawl": CrawlCreate,
}


async def submit(
    db: ConnectionManager,
    settings: Settings,
    guard: SSRFGuard,
    waker: TaskWaker,
    tenant: str,
    body: JobSpecBase,
    idempotency_key: str | None,
) -> tuple[JobPublic, bool]:
    """A submission as POST /scrape and POST /crawl take it (and HotPathMiddleware, which
    answers them before routing): (job, created), or a domain error (422, 409, 429).

    Nothing in the database is touched before the request is known to be acceptable: a
    refused request (422) costs the tenant none of its rate allowance. Then the tenant's
    limits (429) and the submission, each one autocommitting statement on the driver
    connection (no session: the route needs none of its unit of work). The executors'
    wake-up follows the commit, coalesced with other submissions' (TaskWaker).
    """
    key = check_idempotency_key(idempotency_key)
    prepared = jobs.prepare_submission(body, guard, settings.default_retain_days)
    async with db.driver() as conn, admin.admitted(conn, settings, tenant):
        job, created = await jobs.submit_job(
            conn,
            tenant,
            body,
            guard=guard,
            idempotency_key=key,
            default_host_limit=settings.per_host_concurrency,
            default_retain_days=settings.default_retain_days,
            prepared=prepared,
            notify=False,
        )
    if created:
        waker.wake()
    return job, created


def submitted_headers(job: JobPublic, created: bool) -> dict[str, str]:
    """Location, and for a replayed Idempotency-Key the marker (the status is then 200)."""
    headers = {"Location": job_location(job.id)}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return headers


def _answered(response: Response, job: JobPublic, created: bool) -> JobPublic:
    response.headers.update(submitted_headers(job, created))
    if not created:
        response.status_code = status.HTTP_200_OK
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
