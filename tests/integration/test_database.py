"""ConnectionManager: session scope semantics, delete-then-commit, pool metrics, isolation."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.database.connection import ConnectionManager, DatabaseUnavailable, is_unavailable
from app.database.models import ClusterState, Worker
from tests import pg
from tests.conftest import make_settings


def _worker(hostname: str) -> Worker:
    return Worker(hostname=hostname, pid=1, concurrency=1, version="test")


@pytest.fixture
async def observer(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A second, independent connection: sees only what was really committed."""
    conn = await asyncpg.connect(pg.asyncpg_dsn(db_url))
    yield conn
    await conn.close()


async def _count(conn: asyncpg.Connection, hostname: str) -> int:
    value = await conn.fetchval("SELECT count(*) FROM workers WHERE hostname = $1", hostname)
    return int(value)


async def test_session_scope_commits_on_success(
    db: ConnectionManager, observer: asyncpg.Connection
) -> None:
    name = f"commit-{uuid.uuid4().hex}"
    async with db.session() as session:
        session.add(_worker(name))
        await session.flush()
        # flushed, not committed: invisible to anyone else
        assert await _count(observer, name) == 0
    assert await _count(observer, name) == 1


async def test_session_scope_rolls_back_on_exception(
    db: ConnectionManager, observer: asyncpg.Connection
) -> None:
    name = f"rollback-{uuid.uuid4().hex}"

    class Boom(Exception):
        pass

    async def failing_unit_of_work() -> None:
        async with db.session() as session:
            session.add(_worker(name))
            await session.flush()
            raise Boom

    with pytest.raises(Boom):
        await failing_unit_of_work()
    assert await _count(observer, name) == 0
    # the connection went back to the pool clean: the next unit of work commits normally
    async with db.session() as session:
        session.add(_worker(name))
    assert await _count(observer, name) == 1


async def test_session_scope_rolls_back_on_cancellation(
    db: ConnectionManager, observer: asyncpg.Connection
) -> None:
    name = f"cancel-{uuid.uuid4().hex}"
    flushed = asyncio.Event()

    async def unit_of_work() -> None:
        async with db.session() as session:
            session.add(_worker(name))
            await session.flush()
            flushed.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(unit_of_work())
    await flushed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _count(observer, name) == 0


async def test_awaited_delete_then_commit_removes_the_row(
    db: ConnectionManager, observer: asyncpg.Connection
) -> None:
    name = f"delete-{uuid.uuid4().hex}"
    async with db.session() as session:
        worker = _worker(name)
        session.add(worker)
    assert await _count(observer, name) == 1

    async with db.session() as session:
        loaded = await session.get(Worker, worker.id)
        assert loaded is not None
        await session.delete(loaded)  # a coroutine in SQLAlchemy 2.x: must be awaited
        await session.commit()
    assert await _count(observer, name) == 0


async def test_pool_metrics_count_checkouts(db: ConnectionManager) -> None:
    before = db.pool_status()
    for _ in range(5):
        async with db.session() as session:
            await session.execute(text("SELECT 1"))
    after = db.pool_status()
    assert after["checkouts"] - before["checkouts"] == 5
    assert after["checkins"] - before["checkins"] == 5
    assert after["checked_out"] == 0
    assert after["connects"] >= 1
    assert after["timeouts"] == 0
    assert after["size"] == db.settings.pool_size


async def test_pool_timeout_is_counted(db_url: str) -> None:
    manager = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=0, pool_timeout=0.2),
        application_name="trawler-test",
    )
    try:
        async with manager.session() as holder:
            await holder.execute(text("SELECT 1"))  # holds the only connection
            started = time.perf_counter()
            with pytest.raises(sa_exc.TimeoutError) as raised:
                async with manager.session() as waiter:
                    await waiter.execute(text("SELECT 1"))
            waited = time.perf_counter() - started
            assert is_unavailable(raised.value)  # the API turns it into 503 + Retry-After
        status = manager.pool_status()
        assert status["timeouts"] == 1
        assert 0.15 < waited < 2.0
        assert status["checked_out"] == 0
    finally:
        await manager.dispose()


async def test_wait_percentiles_reflect_contention(db_url: str) -> None:
    manager = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=0, pool_timeout=5.0),
        application_name="trawler-test",
    )
    hold_s = 0.3
    holding = asyncio.Event()

    async def hold() -> None:
        async with manager.session() as session:
            await session.execute(text("SELECT 1"))
            holding.set()
            await asyncio.sleep(hold_s)

    async def wait_for_connection() -> None:
        await holding.wait()
        async with manager.session() as session:
            await session.execute(text("SELECT 1"))

    try:
        await asyncio.gather(hold(), wait_for_connection())
        waits = manager.pool_status()["wait_ms"]
        # one checkout waited for the holder to finish (most of hold_s); p99 shows it
        assert waits["max"] >= hold_s * 1000 * 0.5
        assert waits["p99"] >= hold_s * 1000 * 0.5
        assert waits["p50"] > 0
        assert manager.pool_status()["timeouts"] == 0
    finally:
        await manager.dispose()


async def test_health_check_reports_unreachable_database_quickly() -> None:
    manager = ConnectionManager(
        make_settings("postgresql://postgres@127.0.0.1:1/none", db_connect_timeout=1.0),
        application_name="trawler-test",
    )
    try:
        started = time.perf_counter()
        with pytest.raises(DatabaseUnavailable):
            await manager.health_check(limit=1.0)
        assert time.perf_counter() - started < 1.5
    finally:
        await manager.dispose()


async def test_health_check_answers(db: ConnectionManager) -> None:
    info = await db.health_check()
    assert info["latency_ms"] >= 0
    assert info["server_version"][0].isdigit()


async def test_savepoint_session_commits_stay_inside_the_test(
    savepoint_session: AsyncSession, shared_db_url: str
) -> None:
    name = f"savepoint-{uuid.uuid4().hex}"
    savepoint_session.add(_worker(name))
    await savepoint_session.commit()  # releases a SAVEPOINT; the outer transaction stays open

    outsider = await asyncpg.connect(pg.asyncpg_dsn(shared_db_url))
    try:
        assert await _count(outsider, name) == 0  # nothing really committed
    finally:
        await outsider.close()

    # a failing statement rolls back to the savepoint only: earlier "commits" survive
    savepoint_session.add(ClusterState(id=1))  # the migration already inserted row 1
    with pytest.raises(sa_exc.IntegrityError):
        await savepoint_session.flush()
    await savepoint_session.rollback()
    found = await savepoint_session.scalar(select(Worker.hostname).where(Worker.hostname == name))
    assert found == name
