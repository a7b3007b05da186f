"""Typed dependency aliases: the database session (committed before the response)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.database.connection import ConnectionManager


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
