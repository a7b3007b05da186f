"""Job routes: list, read, pages, progress stream, cancel, retry, resume, delete, bulk."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from app.api.deps import DbDep, PageParamsDep, PrincipalDep, SessionDep, SettingsDep
from app.api.errors import NotFound
from app.api.resources import JobEventsDep
from app.api.routes.common import (
    API_PREFIX,
    as_utc,
    decode_job_cursor,
    decode_page_cursor,
    encode_job_cursor,
    encode_page_cursor,
    job_or_404,
    parse_statuses,
)
from app.api.schemas import (
    BulkJobsCreate,
    BulkResultPublic,
    CursorPage,
    JobPublic,
    PagePublic,
)
from app.database.models import JobKind
from app.services import admin, events, jobs

router = APIRouter(prefix=f"{API_PREFIX}/jobs", tags=["jobs"])


@router.get("", response_model=CursorPage[JobPublic])
async def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    page: PageParamsDep,
    status_: Annotated[
        list[str] | None,
        Query(alias="status", description="repeat or comma-separate: queued,running"),
    ] = None,
    kind: JobKind | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> CursorPage[JobPublic]:
    """The tenant's jobs, newest first, with keyset pagination."""
    filters = jobs.JobFilters(
        statuses=parse_statuses(status_),
        kind=kind,
        created_after=as_utc(created_after),
        created_before=as_utc(created_before),
    )
    items, last = await jobs.list_jobs(
        session,
        principal.tenant,
        filters,
        limit=page.limit,
        after=decode_job_cursor(page.cursor),
    )
    return CursorPage[JobPublic](items=items, next_cursor=encode_job_cursor(last))


@router.post("/bulk", response_model=BulkResultPublic)
async def bulk_jobs(
    body: BulkJobsCreate, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> BulkResultPublic:
    """cancel, delete or retry up to 1,000 jobs; an outcome per id (ok/not_found/conflict).

    retry counts every id against the tenant's active-jobs limit (429 when over)."""
    if body.action != "retry":
        return await jobs.bulk(session, principal.tenant, body.action, body.ids)
    async with admin.admitted(session, settings, principal.tenant, jobs=len(set(body.ids))):
        return await jobs.bulk(session, principal.tenant, body.action, body.ids)


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: uuid.UUID, db: DbDep, principal: PrincipalDep) -> Response:
    """The hot read: no session, the JSON built from the row (schema: JobPublic)."""
    body = await jobs.get_job_json(db, principal.tenant, job_id)
    if body is None:
        raise NotFound(f"job {job_id} not found")
    return Response(body, media_type="application/json")


@router.get("/{job_id}/pages", response_model=CursorPage[PagePublic])
async def list_pages(
    job_id: uuid.UUID,
    session: SessionDep,
    principal: PrincipalDep,
    page: PageParamsDep,
    status_: Annotated[Literal["ok", "error"] | None, Query(alias="status")] = None,
) -> CursorPage[PagePublic]:
    """Stored results in fetch order; status=ok|error filters on the outcome."""
    items, after = await jobs.list_pages(
        session,
        principal.tenant,
        job_id,
        ok=None if status_ is None else status_ == "ok",
        limit=page.limit,
        after=decode_page_cursor(page.cursor),
    )
    return CursorPage[PagePublic](items=items, next_cursor=encode_page_cursor(after))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "SSE stream"}},
)
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    db: DbDep,
    hub: JobEventsDep,
) -> StreamingResponse:
    """Server-Sent Events: `progress` and `status` (the job resource) until it finishes."""
    # the request session ends when this returns; the stream reads with connections of
    # its own, so it never pins a pooled connection
    await job_or_404(session, principal.tenant, job_id)
    stream = events.job_stream(
        db, hub, principal.tenant, job_id, is_disconnected=request.is_disconnected
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/{job_id}/cancel", response_model=JobPublic)
async def cancel_job(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> JobPublic:
    """Idempotent; 409 once the job completed or failed."""
    return await jobs.cancel_job(session, principal.tenant, job_id)


@router.post("/{job_id}/retry", response_model=JobPublic)
async def retry_job(
    job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> JobPublic:
    """Re-queue the failed tasks of a finished job; 409 while it runs or if none failed;
    429 when the tenant is at its limits."""
    async with admin.admitted(session, settings, principal.tenant):
        return await jobs.retry_job(session, principal.tenant, job_id)


@router.post("/{job_id}/resume", response_model=JobPublic)
async def resume_job(
    job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, settings: SettingsDep
) -> JobPublic:
    """Continue a cancelled job from where it stopped (a crawl from its frontier): its
    cancelled tasks are queued again; 409 unless cancelled; 429 at the tenant's limits."""
    async with admin.admitted(session, settings, principal.tenant):
        return await jobs.resume_job(session, principal.tenant, job_id)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
async def delete_job(job_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> Response:
    """Delete a finished job with all its tasks, pages and events; 409 while it runs."""
    await jobs.delete_job(session, principal.tenant, job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
