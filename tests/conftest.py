"""Shared fixtures: real PostgreSQL (template-cloned or savepoint-isolated), app clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.migrations import upgrade_to_head
from app.main import create_app
from tests import pg


@pytest.fixture(scope="session")
def pg_server() -> str:
    return pg.server_url()


@pytest.fixture(scope="session")
async def template_db(pg_server: str) -> AsyncIterator[str]:
    """A database migrated once per run; tests clone it (CREATE DATABASE ... TEMPLATE)."""
    name = pg.unique_name("trawler_tpl")
    await pg.admin_execute(pg_server, f'CREATE DATABASE "{name}"')
    url = pg.with_database(pg_server, name)
    engine = create_async_engine(Settings(database_url=url).database_url or "")
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()
    yield name
    await pg.admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db_url(pg_server: str, template_db: str) -> AsyncIterator[str]:
    """A fresh migrated database of its own, for tests that need real commits."""
    name = pg.unique_name("trawler_t")
    await pg.admin_execute(pg_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield pg.with_database(pg_server, name)
    await pg.admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "allow_private_networks": True,
        "pool_size": 5,
        "max_overflow": 5,
        "pool_timeout": 2.0,
        "heartbeat_seconds": 1.0,
        "poll_interval": 0.2,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[ConnectionManager]:
    manager = ConnectionManager(settings, application_name="trawler-test")
    yield manager
    await manager.dispose()


@pytest.fixture(scope="session")
async def shared_db_url(pg_server: str, template_db: str) -> AsyncIterator[str]:
    """One migrated database for savepoint-isolated tests (nothing they do is committed)."""
    name = pg.unique_name("trawler_sp")
    await pg.admin_execute(pg_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield pg.with_database(pg_server, name)
    await pg.admin_execute(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def savepoint_session(shared_db_url: str) -> AsyncIterator[AsyncSession]:
    """A session inside an outer transaction that is rolled back after the test.

    The session's own commit() only releases a SAVEPOINT, so code under test can commit
    as it does in production while the test leaves nothing behind.
    """
    engine = create_async_engine(make_settings(shared_db_url).database_url or "")
    async with engine.connect() as conn:
        outer = await conn.begin()
        session = AsyncSession(
            bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint"
        )
        try:
            yield session
        finally:
            await session.close()
            await outer.rollback()
    await engine.dispose()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings, migrate=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
        yield c
