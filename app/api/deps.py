"""Typed dependency aliases: the database session (committed before the response), auth,
pagination."""

from __future__ import annotations

import hmac
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.errors import Forbidden, Unauthorized
from app.api.resources import get_listener
from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.listener import PgListener
from app.services import apikeys
from app.services.apikeys import Principal

__all__ = [
    "AdminDep",
    "DbDep",
    "MetricsAccessDep",
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
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

# LISTEN connections that already deliver key revocations to the key cache
_watching: weakref.WeakSet[PgListener] = weakref.WeakSet()


def watch_revocations(app: FastAPI) -> None:
    """Subscribe the key cache to revocations (NOTIFY trawler_keys) on this app's LISTEN
    connection, once; it is created on first use, like the SSE streams'."""
    listener: PgListener | None = getattr(app.state, "pg_listener", None)
    if listener is not None and listener in _watching:
        return
    listener = get_listener(app)
    if listener not in _watching:
        listener.subscribe(apikeys.NOTIFY_KEYS, apikeys.on_key_notification)
        _watching.add(listener)


async def get_principal(request: Request, credentials: Credentials) -> Principal:
    """401 without a key or with a malformed, unknown or revoked one.

    A key verified in the last seconds is answered from the cache (and re-verified in the
    background shortly before its entry expires); a miss is verified in a unit of work of
    its own (it may record last_used_at, committed at once). Either way the route's own
    session is not involved, so routes that need none (GET /jobs/{id}) never open one.
    """
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    watch_revocations(request.app)
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


async def get_metrics_access(request: Request, credentials: Credentials) -> None:
    """GET /metrics: the configured metrics token (TRAWLER_METRICS_TOKEN), or an admin key.

    A scraper holding only the token never holds a key that could reach the admin routes.
    """
    token = request.app.state.settings.metrics_token
    if token is not None and credentials is not None:
        presented = credentials.credentials.strip().encode("utf-8")
        if hmac.compare_digest(presented, token.get_secret_value().encode("utf-8")):
            return
    await get_admin(await get_principal(request, credentials))


MetricsAccessDep = Annotated[None, Depends(get_metrics_access)]


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
