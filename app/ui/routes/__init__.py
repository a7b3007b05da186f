"""Every dashboard route, under /ui; none appears in the API's OpenAPI schema."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.ui.render import UI_PREFIX, UIRoute, see_other
from app.ui.routes import jobs, ops, session, submit

router = APIRouter(prefix=UI_PREFIX, include_in_schema=False, route_class=UIRoute)


@router.get("")
async def home() -> Response:
    return see_other(session.HOME)


router.include_router(session.router)
# /jobs/new before /jobs/{job_id}
router.include_router(submit.router)
router.include_router(jobs.router)
router.include_router(ops.router)

__all__ = ["router"]
