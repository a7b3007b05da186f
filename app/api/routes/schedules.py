"""Schedule routes: create, list, read, delete, enable/disable, run history."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from app.api.deps import PageParamsDep, PrincipalDep, SessionDep, SettingsDep
from app.api.resources import GuardDep
from app.api.routes.common import (
    API_PREFIX,
    decode_job_cursor,
    decode_page_cursor,
    encode_job_cursor,
    encode_page_cursor,
)
from app.api.schemas import CursorPage, ScheduleCreate, SchedulePublic, ScheduleRunPublic
from app.services import schedules

router = APIRouter(prefix=f"{API_PREFIX}/schedules", tags=["schedules"])


def schedule_location(schedule_id: uuid.UUID) -> str:
    return f"{API_PREFIX}/schedules/{schedule_id}"


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SchedulePublic)
async def create_schedule(
    body: ScheduleCreate,
    response: Response,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    guard: GuardDep,
) -> SchedulePublic:
    """A cron schedule (5 fields, or 6 with seconds first) in a time zone, submitting the
    `template` job (a POST /scrape or /crawl body) at every tick."""
    schedule = await schedules.create_schedule(
        await session.connection(), principal.tenant, body, settings=settings, guard=guard
    )
    response.headers["Location"] = schedule_location(schedule.id)
    return schedule


@router.get("", response_model=CursorPage[SchedulePublic])
async def list_schedules(
    session: SessionDep, principal: PrincipalDep, page: PageParamsDep
) -> CursorPage[SchedulePublic]:
    """The tenant's schedules, newest first, with their next run times."""
    items, last = await schedules.list_schedules(
        await session.connection(),
        principal.tenant,
        limit=page.limit,
        after=decode_job_cursor(page.cursor),
    )
    return CursorPage[SchedulePublic](items=items, next_cursor=encode_job_cursor(last))


@router.get("/{schedule_id}", response_model=SchedulePublic)
async def get_schedule(
    schedule_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> SchedulePublic:
    return await schedules.get_schedule(await session.connection(), principal.tenant, schedule_id)


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
async def delete_schedule(
    schedule_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> Response:
    """Delete the schedule and its run history; the jobs it submitted are kept."""
    await schedules.delete_schedule(session, principal.tenant, schedule_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{schedule_id}/enable", response_model=SchedulePublic)
async def enable_schedule(
    schedule_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> SchedulePublic:
    """Ticks resume from now (those missed while disabled are not made up)."""
    return await schedules.set_enabled(
        await session.connection(), principal.tenant, schedule_id, True
    )


@router.post("/{schedule_id}/disable", response_model=SchedulePublic)
async def disable_schedule(
    schedule_id: uuid.UUID, session: SessionDep, principal: PrincipalDep
) -> SchedulePublic:
    return await schedules.set_enabled(
        await session.connection(), principal.tenant, schedule_id, False
    )


@router.get("/{schedule_id}/runs", response_model=CursorPage[ScheduleRunPublic])
async def list_runs(
    schedule_id: uuid.UUID, session: SessionDep, principal: PrincipalDep, page: PageParamsDep
) -> CursorPage[ScheduleRunPublic]:
    """What each tick did (submitted, skipped, queued, error), newest first."""
    items, last = await schedules.list_runs(
        await session.connection(),
        principal.tenant,
        schedule_id,
        limit=page.limit,
        before=decode_page_cursor(page.cursor) or None,
    )
    return CursorPage[ScheduleRunPublic](items=items, next_cursor=encode_page_cursor(last))
