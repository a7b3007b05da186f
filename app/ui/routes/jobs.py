"""Dashboard job pages: the list, one job (live progress, pages, actions), its progress
stream and its exports. Reads and actions go through app.services (tenant-scoped SQL)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Final, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.api.deps import DbDep, SettingsDep
from app.api.errors import Conflict, TooManyRequests
from app.api.resources import JobEventsDep
from app.api.routes.common import (
    decode_job_cursor,
    decode_page_cursor,
    encode_job_cursor,
    encode_page_cursor,
    job_or_404,
)
from app.api.routes.export import ExportResponse
from app.api.schemas import JobPublic
from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.models import TERMINAL_JOB_STATUSES, JobStatus
from app.services import admin, events, jobs
from app.services import export as export_service
from app.services.export import ExportFormat, ExportRequest, StatusFilter
from app.ui import cookies
from app.ui.auth import CsrfUserDep, UIUserDep
from app.ui.render import UI_PREFIX, UIRoute, UIUser, finished_of, page, see_other, url_with

router = APIRouter(prefix="/jobs", route_class=UIRoute)

JOBS_PER_PAGE: Final = 25
PAGES_PER_PAGE: Final = 25
PREVIEW_CHARS: Final = 160
PREVIEW_FIELDS: Final = 6

STATUS_FILTERS: Final[dict[str, tuple[str, tuple[JobStatus, ...]]]] = {
    "all": ("All", ()),
    "active": ("Active", (JobStatus.queued, JobStatus.running)),
    "queued": ("Queued", (JobStatus.queued,)),
    "running": ("Running", (JobStatus.running,)),
    "completed": ("Completed", (JobStatus.completed,)),
    "failed": ("Failed", (JobStatus.failed,)),
    "cancelled": ("Cancelled", (JobStatus.cancelled,)),
}
PAGE_FILTERS: Final = (("all", "All"), ("ok", "Succeeded"), ("error", "Failed"))
EXPORT_FORMATS: Final = (
    ("csv", "CSV"),
    ("jsonl", "JSON Lines"),
    ("json", "JSON"),
    ("xlsx", "Excel"),
)

StatusParam = Annotated[
    Literal["all", "active", "queued", "running", "completed", "failed", "cancelled"],
    Query(alias="status"),
]
CursorParam = Annotated[str | None, Query(max_length=512)]
PagesParam = Annotated[Literal["all", "ok", "error"], Query(alias="pages")]


# --------------------------------------------------------------------------------------
# Helpers shared with the templates


def progress_summary(job: JobPublic) -> str:
    """The sentence read out by screen readers; app.js builds the same one on updates."""
    p = job.progress
    finished = finished_of(job)
    text = f"{finished:,} of {p.total:,} pages done: {p.succeeded:,} succeeded, {p.failed:,} failed"
    skipped = finished - p.succeeded - p.failed
    if skipped:
        text += f", {skipped:,} not fetched"
    if p.queued or p.running:
        text += f", {p.queued:,} queued, {p.running:,} running"
    return f"{text}. Status: {job.status.value}."


def target_of(job: JobPublic) -> str:
    """What a job works on, in a few words: its first seed, or its URL count."""
    seeds = job.spec.get("seeds")
    if isinstance(seeds, list) and seeds:
        more = f" (+{len(seeds) - 1})" if len(seeds) > 1 else ""
        return f"{seeds[0]}{more}"
    count = job.spec.get("url_count")
    if isinstance(count, int):
        return f"{count:,} URL{'s' if count != 1 else ''}"
    return ""


def preview(data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """A page's extracted values, shortened for the table."""
    for i, (name, value) in enumerate(sorted(data.items())):
        if i == PREVIEW_FIELDS:
            yield "…", f"{len(data) - PREVIEW_FIELDS} more in the export"
            return
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        if len(text) > PREVIEW_CHARS:
            text = text[: PREVIEW_CHARS - 1] + "…"
        yield name, text


def _fields(spec: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    extract = spec.get("extract")
    rows = []
    if isinstance(extract, dict):
        for name, field in sorted(extract.items()):
            if not isinstance(field, dict):
                continue
            how = next((k for k in ("css", "xpath", "builtin") if field.get(k)), "?")
            takes = str(field.get("value", "text"))
            if field.get("all"):
                takes += ", all matches"
            rows.append((name, how, str(field.get(how, "")), takes))
    return rows


def _actions(job: JobPublic) -> dict[str, bool]:
    terminal = job.status in TERMINAL_JOB_STATUSES
    return {
        "cancel": not terminal,
        "retry": terminal and job.progress.failed > 0,
        "resume": job.status == JobStatus.cancelled,
        "delete": terminal,
    }


# --------------------------------------------------------------------------------------
# The list


async def _list_context(
    db: ConnectionManager, user: UIUser, status: str, cursor: str | None
) -> dict[str, Any]:
    statuses = STATUS_FILTERS[status][1]
    async with db.session() as session:
        items, last = await jobs.list_jobs(
            session,
            user.principal.tenant,
            jobs.JobFilters(statuses=statuses),
            limit=JOBS_PER_PAGE,
            after=decode_job_cursor(cursor),
        )
    status_param = None if status == "all" else status
    return {
        "jobs": items,
        "filters": [(key, label) for key, (label, _) in STATUS_FILTERS.items()],
        "current_filter": status,
        "status_param": status_param,
        "cursor": cursor,
        "next_cursor": encode_job_cursor(last),
        "active_count": sum(1 for j in items if j.status not in TERMINAL_JOB_STATUSES),
        "rows_url": url_with(f"{UI_PREFIX}/jobs/rows", status=status_param, cursor=cursor),
        "caption": f"{STATUS_FILTERS[status][0]} jobs, newest first",
        "target_of": target_of,
    }


@router.get("")
async def list_jobs(
    request: Request,
    user: UIUserDep,
    db: DbDep,
    status: StatusParam = "all",
    cursor: CursorParam = None,
) -> Response:
    """The tenant's jobs, newest first, a page at a time (the API's keyset cursor)."""
    return page(request, "jobs.html", await _list_context(db, user, status, cursor))


@router.get("/rows")
async def job_rows(
    request: Request,
    user: UIUserDep,
    db: DbDep,
    status: StatusParam = "all",
    cursor: CursorParam = None,
) -> Response:
    """The list's rows alone, polled by the page while some job on it is active."""
    context = await _list_context(db, user, status, cursor)
    return page(request, "_job_rows.html", context, fragment=True)


# --------------------------------------------------------------------------------------
# One job


async def _job_context(
    db: ConnectionManager,
    user: UIUser,
    job_id: uuid.UUID,
    *,
    pages_filter: str = "all",
    cursor: str | None = None,
    with_pages: bool = True,
) -> dict[str, Any]:
    tenant = user.principal.tenant
    async with db.session() as session:
        job = await job_or_404(session, tenant, job_id)
        items: list[Any] = []
        after = None
        if with_pages:
            items, after = await jobs.list_pages(
                session,
                tenant,
                job_id,
                ok=None if pages_filter == "all" else pages_filter == "ok",
                limit=PAGES_PER_PAGE,
                after=decode_page_cursor(cursor),
            )
    pages_param = None if pages_filter == "all" else pages_filter
    seeds = job.spec.get("seeds")
    follow = job.spec.get("follow")
    return {
        "job": job,
        "terminal": job.status in TERMINAL_JOB_STATUSES,
        "summary": progress_summary(job),
        "actions": _actions(job),
        "formats": EXPORT_FORMATS,
        "targets": seeds[:20] if isinstance(seeds, list) else [],
        "follow": follow if isinstance(follow, dict) else None,
        "fields": _fields(job.spec),
        "spec_json": orjson.dumps(job.spec, option=orjson.OPT_INDENT_2).decode(),
        "pages": items,
        "pages_filter": pages_filter,
        "pages_param": pages_param,
        "pages_cursor": cursor,
        "pages_next": encode_page_cursor(after),
        "page_filters": PAGE_FILTERS,
        # the first page of results follows the job live; later pages stay put
        "live_pages": cursor is None,
        "pages_url": url_with(f"{UI_PREFIX}/jobs/{job_id}/pages", pages=pages_param),
        "preview": preview,
        "problem": None,
    }


@router.get("/{job_id}")
async def job_detail(
    request: Request,
    job_id: uuid.UUID,
    user: UIUserDep,
    db: DbDep,
    pages: PagesParam = "all",
    cursor: CursorParam = None,
) -> Response:
    context = await _job_context(db, user, job_id, pages_filter=pages, cursor=cursor)
    return page(request, "job.html", context)


@router.get("/{job_id}/state")
async def job_state(request: Request, job_id: uuid.UUID, user: UIUserDep, db: DbDep) -> Response:
    """Details and actions, refreshed when the job's status changes."""
    context = await _job_context(db, user, job_id, with_pages=False)
    return page(request, "_job_state.html", context, fragment=True)


@router.get("/{job_id}/pages")
async def job_pages(
    request: Request,
    job_id: uuid.UUID,
    user: UIUserDep,
    db: DbDep,
    pages: PagesParam = "all",
) -> Response:
    """The first page of results, refreshed while the job runs."""
    context = await _job_context(db, user, job_id, pages_filter=pages)
    return page(request, "_job_pages.html", context, fragment=True)


@router.get("/{job_id}/events")
async def job_events(
    request: Request, job_id: uuid.UUID, user: UIUserDep, db: DbDep, hub: JobEventsDep
) -> StreamingResponse:
    """The API's progress stream (app.services.events) for the page's EventSource, which
    cannot send an Authorization header: this route takes the session cookie instead."""
    tenant = user.principal.tenant
    async with db.session() as session:
        await job_or_404(session, tenant, job_id)
    # the stream reads with short connections of its own, never the request's
    stream = events.job_stream(db, hub, tenant, job_id, is_disconnected=request.is_disconnected)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{job_id}/export")
async def job_export(
    job_id: uuid.UUID,
    user: UIUserDep,
    db: DbDep,
    format_: Annotated[ExportFormat, Query(alias="format")] = "csv",
    status: Annotated[StatusFilter, Query()] = "all",
) -> ExportResponse:
    """The API's streamed export (app.services.export), opened by the session cookie."""
    wanted = ExportRequest(format=format_, status=status)
    export = await export_service.open_export(db, user.principal.tenant, job_id, wanted)
    return ExportResponse(export)


# --------------------------------------------------------------------------------------
# Actions: each one unit of work; a refusal (409, 429) shows the job page with the reason


Action = Literal["cancel", "retry", "resume", "delete"]
_DONE: Final[dict[str, str]] = {
    "cancel": "cancelled",
    "retry": "retried",
    "resume": "resumed",
    "delete": "deleted",
}


async def _act(
    request: Request,
    db: ConnectionManager,
    settings: Settings,
    user: UIUser,
    job_id: uuid.UUID,
    action: Action,
) -> Response:
    tenant = user.principal.tenant
    try:
        async with db.session() as session:
            if action == "cancel":
                await jobs.cancel_job(session, tenant, job_id)
            elif action == "delete":
                await jobs.delete_job(session, tenant, job_id)
            else:
                async with admin.admitted(session, settings, tenant):
                    if action == "retry":
                        await jobs.retry_job(session, tenant, job_id)
                    else:
                        await jobs.resume_job(session, tenant, job_id)
    except (Conflict, TooManyRequests) as refused:
        context = await _job_context(db, user, job_id)
        context["problem"] = refused.detail
        return page(
            request, "job.html", context, status_code=refused.status, headers=refused.headers
        )
    target = f"{UI_PREFIX}/jobs" if action == "delete" else f"{UI_PREFIX}/jobs/{job_id}"
    response = see_other(target)
    cookies.set_flash(request, response, _DONE[action])
    return response


@router.post("/{job_id}/cancel")
async def cancel(
    request: Request, job_id: uuid.UUID, user: CsrfUserDep, db: DbDep, settings: SettingsDep
) -> Response:
    return await _act(request, db, settings, user, job_id, "cancel")


@router.post("/{job_id}/retry")
async def retry(
    request: Request, job_id: uuid.UUID, user: CsrfUserDep, db: DbDep, settings: SettingsDep
) -> Response:
    return await _act(request, db, settings, user, job_id, "retry")


@router.post("/{job_id}/resume")
async def resume(
    request: Request, job_id: uuid.UUID, user: CsrfUserDep, db: DbDep, settings: SettingsDep
) -> Response:
    return await _act(request, db, settings, user, job_id, "resume")


@router.post("/{job_id}/delete")
async def delete(
    request: Request, job_id: uuid.UUID, user: CsrfUserDep, db: DbDep, settings: SettingsDep
) -> Response:
    return await _act(request, db, settings, user, job_id, "delete")
