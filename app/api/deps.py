"""Typed dependency aliases: the database session (committed before the response), auth,
pagination."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.errors import Forbidden, Unauthorized
from app.config import Settings
from app.database.connection import ConnectionManager
from app.services import apikeys
from app.services.apikeys import Principal

__all__ = [
    "AdminDep",
    "DbDep",
    "PageParams",
    "PageParamsDep",
    "Principal",
    "PrincipalDep",
    "SessionDep",
    "SettingsDep",
]


def _db(request: Request) -> ConnectionManager:
    db: ConnectionManager = request.app.state.db
    return db


# `async def` although they await nothing: FastAPI runs plain `def` dependencies in a
# worker thread, a needless hop on every request
async def get_db(request: Request) -> ConnectionManager:
    return _db(request)


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; commits when the handler returns, before the response."""
    async with _db(request).session() as session:
        yield session


DbDep = Annotated[ConnectionManager, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# scope="function": the code after `yield` (the commit) runs before the response is sent,
# so a failed commit becomes an error answer instead of a 2xx for lost work.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


# --------------------------------------------------------------------------------------
# Auth: `Authorization: Bearer <key>` -> Principal (key id, tenant, role)

_bearer = HTTPBearer(auto_error=False, description="an API key: trw_<prefix>_<secret>")


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """401 without a key or with a malformed, unknown or revoked one.

    A key verified in the last seconds is answered from the cache (and re-verified in the
    background shortly before its entry expires); a miss is verified in a unit of work of
    its own (it may record last_used_at, committed at once). Either way the route's own
    session is not involved, so routes that need none (GET /jobs/{id}) never open one.
    """
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = credentials.credentials.strip()
    principal, due = apikeys.cached_principal(key)
    if principal is None:
        async with _db(request).session() as session:
            principal = await apikeys.authenticate(session, key)
    elif due:
        apikeys.refresh(_db(request).session, key)
    if principal is None:
        raise Unauthorized("invalid or revoked API key")
    return principal


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this route needs an admin API key")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]


# --------------------------------------------------------------------------------------
# Keyset pagination parameters (the cursor is opaque; routes decode it)


@dataclass(frozen=True, slots=True)
class PageParams:
    limit: int
    cursor: str | None


# async for the same reason as get_db: no threadpool hop
async def get_page_params(
    limit: Annotated[int, Query(ge=1, le=200, description="items per page")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
) -> PageParams:
    return PageParams(limit=limit, cursor=cursor or None)


PageParamsDep = Annotated[PageParams, Depends(get_page_params)]
