"""API fixtures: keys created through app.services.apikeys in the per-test database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from app.services import apikeys
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.support.executors import stop_all

Headers = dict[str, str]


async def make_key(
    db: ConnectionManager, name: str, *, tenant: str | None = None, admin: bool = False
) -> str:
    async with db.session() as session:
        _, key = await apikeys.create_key(session, name, tenant=tenant, admin=admin)
    return key


def bearer(key: str) -> Headers:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def api_key(db: ConnectionManager) -> str:
    return await make_key(db, "tenant-a")


@pytest.fixture
def auth_headers(api_key: str) -> Headers:
    return bearer(api_key)


@pytest.fixture
async def other_headers(db: ConnectionManager) -> Headers:
    """A user key of another tenant."""
    return bearer(await make_key(db, "tenant-b"))


@pytest.fixture
async def admin_headers(db: ConnectionManager) -> Headers:
    return bearer(await make_key(db, "ops", admin=True))


@pytest.fixture
def guarded_settings(db_url: str) -> Settings:
    """The production default: the SSRF guard on."""
    return make_settings(db_url, allow_private_networks=False)


@pytest.fixture
async def guarded_client(guarded_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(guarded_settings, migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


Count = Callable[[str], Coroutine[Any, Any, int]]


@pytest.fixture
def count(db: ConnectionManager) -> Count:
    """Rows in a table (committed state, read on a connection of its own)."""

    async def _count(table: str) -> int:
        assert table in {"jobs", "tasks", "task_queue", "pages", "job_events", "api_keys"}
        async with db.engine.connect() as conn:
            return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())

    return _count


SqlRun = Callable[..., Coroutine[Any, Any, list[Any]]]


@pytest.fixture
def sql(db: ConnectionManager) -> SqlRun:
    """Run one statement in its own committed transaction; returns the rows (if any)."""

    async def _run(statement: str, **params: Any) -> list[Any]:
        async with db.engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []

    return _run


@pytest.fixture
async def executors(db_url: str) -> AsyncIterator[list[AsyncJobExecutor]]:
    """Executors started by a test (tests.support.executors.start_executor), stopped after,
    before the test's database is dropped (hence the dependency on db_url)."""
    started: list[AsyncJobExecutor] = []
    yield started
    await stop_all(started)
