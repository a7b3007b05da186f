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


def get_db(request: Request) -> ConnectionManager:
    db: ConnectionManager = request.app.state.db
    return db


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; commits when the handler returns, before the response."""
    async with get_db(request).session() as session:
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
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """401 without a key or with a malformed, unknown or revoked one."""
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    principal = await apikeys.authenticate(session, credentials.credentials.strip())
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


# `async def` although it awaits nothing: FastAPI runs plain `def` dependencies in a
# worker thread, a needless hop on every request
async def get_page_params(
    limit: Annotated[int, Query(ge=1, le=200, description="items per page")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
) -> PageParams:
    return PageParams(limit=limit, cursor=cursor or None)


PageParamsDep = Annotated[PageParams, Depends(get_page_params)]
