"""The connection pool: a one-round-trip checkout ping that still replaces killed connections,
and first-come-first-served hand-over of connections to waiting checkouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from app.services import apikeys
from tests import pg
from tests.conftest import make_settings


@pytest.fixture
def one_connection(db_url: str) -> Settings:
    """A pool of exactly one connection: the next checkout is the connection we kill."""
    return make_settings(db_url, pool_size=1, max_overflow=0)


@pytest.fixture
async def single(one_connection: Settings) -> AsyncIterator[ConnectionManager]:
    manager = ConnectionManager(one_connection, application_name="trawler-test-ping")
    yield manager
    await manager.dispose()


async def _backend_pid(db: ConnectionManager) -> int:
    async with db.session() as session:
        return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def _terminate(db_url: str, pid: int) -> None:
    conn = await asyncpg.connect(pg.asyncpg_dsn(db_url))
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(100):  # terminate only signals: wait until the backend is gone
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid=$1", pid):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"backend {pid} still there")
    finally:
        await conn.close()


def _log_queries(db: ConnectionManager) -> list[str]:
    """The statements every connection of `db` sends from now on (asyncpg's loggers)."""
    seen: list[str] = []

    def log(record: Any) -> None:
        seen.append(record.query)

    @event.listens_for(db.engine.sync_engine, "connect")
    def _attach(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(log)

    return seen


async def _checkout_statements(
    db: ConnectionManager, seen: list[str], *, one_statement: bool = False
) -> list[str]:
    """What a checkout of the pooled connection sends before the caller's own statement:
    a unit of work's (engine.connect(), sessions) or a hot path's (driver())."""
    seen.clear()
    if one_statement:
        async with db.driver() as driver:
            await asyncio.sleep(0.05)  # asyncpg calls query loggers soon, not at once
            sent = list(seen)
            await driver.execute("SELECT 2")
    else:
        async with db.engine.connect() as conn:
            await asyncio.sleep(0.05)
            sent = list(seen)
            await conn.execute(text("SELECT 2"))
    await asyncio.sleep(0.05)  # the log entry of SELECT 2 arrives before the next clear()
    return sent


async def test_checkout_ping_is_one_statement(db_url: str) -> None:
    """A pooled connection is checked with one statement: no BEGIN/ROLLBACK around it
    (pool_ping_idle_s=0: every checkout pings, as pool_pre_ping does)."""
    db = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=0, pool_ping_idle_s=0),
        application_name="trawler-test-ping",
    )
    try:
        seen = _log_queries(db)
        await _backend_pid(db)  # creates the connection (fresh: not pinged)
        assert await _checkout_statements(db, seen) == ["SELECT 1"]
        assert await _checkout_statements(db, seen) == ["SELECT 1"]
    finally:
        await db.dispose()


async def test_recently_used_connection_is_not_pinged_on_the_hot_paths(db_url: str) -> None:
    """A one-statement checkout (driver()) within pool_ping_idle_s of the connection's last
    clean use gets it as it is; idle longer, or after a failed use, it is pinged first.
    Every other checkout is always pinged."""
    db = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=0, pool_ping_idle_s=0.3),
        application_name="trawler-test-ping",
    )
    try:
        seen = _log_queries(db)
        await _backend_pid(db)
        assert await _checkout_statements(db, seen, one_statement=True) == []  # used just now
        assert await _checkout_statements(db, seen) == ["SELECT 1"]  # a unit of work
        await asyncio.sleep(0.4)
        assert await _checkout_statements(db, seen, one_statement=True) == ["SELECT 1"]
        with pytest.raises(asyncpg.PostgresError):
            async with db.driver() as driver:  # a failed use leaves it open ...
                await driver.execute("SELECT 1/0")
        await asyncio.sleep(0.05)  # its log entry arrives late
        # ... and suspect
        assert await _checkout_statements(db, seen, one_statement=True) == ["SELECT 1"]
        assert await _checkout_statements(db, seen, one_statement=True) == []
    finally:
        await db.dispose()


async def test_killed_connection_is_detected_and_replaced(
    single: ConnectionManager, db_url: str
) -> None:
    seen = _log_queries(single)
    before = await _backend_pid(single)
    await _terminate(db_url, before)
    # the next unit of work succeeds on a new backend; the dead one was noticed at checkout,
    # by the driver (the server closed the socket), although it was used just now
    seen.clear()
    after = await _backend_pid(single)
    assert after != before
    assert single.metrics.invalidations >= 1
    assert single.metrics.connects == 2
    await asyncio.sleep(0.05)  # query log entries arrive late
    assert seen and "SELECT 1" not in seen  # no ping was needed to find out


async def test_request_after_its_connection_was_killed_succeeds(
    one_connection: Settings, db_url: str
) -> None:
    application = create_app(one_connection, migrate=False)
    async with application.router.lifespan_context(application):
        db: ConnectionManager = application.state.db
        async with db.session() as session:
            _, key = await apikeys.create_key(session, "ping", tenant="ping")
        headers = {"Authorization": f"Bearer {key}"}
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            created = await c.post(
                "/api/v1/scrape", json={"urls": ["http://example.com/a"]}, headers=headers
            )
            assert created.status_code == 202, created.text
            pid = await _backend_pid(db)
            await _terminate(db_url, pid)
            got = await c.get(created.headers["Location"], headers=headers)
            assert got.status_code == 200, got.text
            assert got.json()["id"] == created.json()["id"]
            assert await _backend_pid(db) != pid


# --------------------------------------------------------------------------------------
# Fair hand-over


async def test_waiters_are_served_in_arrival_order(db_url: str) -> None:
    """A checkout arriving just as a connection comes back does not overtake the waiters."""
    manager = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=0, pool_timeout=5.0),
        application_name="trawler-test-fair",
    )
    order: list[int] = []
    release = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def use(i: int) -> None:
        async with manager.engine.connect() as conn:
            order.append(i)
            await conn.execute(text("SELECT 1"))

    async def hold() -> None:
        async with manager.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await release.wait()

    def newcomer(*_: Any) -> None:
        # runs as the held connection is checked in, before any waiter has resumed
        if not tasks[-1:] or tasks[-1].get_name() != "newcomer":
            tasks.append(asyncio.get_running_loop().create_task(use(99), name="newcomer"))

    try:
        holder = asyncio.create_task(hold())
        while manager.pool_status()["checked_out"] == 0:
            await asyncio.sleep(0.01)
        for i in range(4):
            tasks.append(asyncio.create_task(use(i)))
            await asyncio.sleep(0.02)  # each is queued before the next arrives
        event.listen(manager.engine.sync_engine, "checkin", newcomer, once=True)
        release.set()
        await holder
        while len(tasks) < 5:
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 99]
        assert manager.pool_status()["connects"] == 1
    finally:
        await manager.dispose()


async def test_more_requests_than_connections_do_not_reconnect(db_url: str) -> None:
    manager = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=3, pool_timeout=5.0),
        application_name="trawler-test-fair",
    )

    async def use() -> None:
        async with manager.session() as session:
            await session.execute(text("SELECT pg_sleep(0.005)"))

    try:
        # 200 at once on 4 connections: each returned connection goes to a waiter, never
        # closed while others wait (the stock pool's full idle queue closed them)
        await asyncio.gather(*(use() for _ in range(200)))
        status = manager.pool_status()
        assert status["connects"] <= 4
        assert status["checkouts"] == 200
        assert status["checked_out"] == 0
    finally:
        await manager.dispose()


async def test_waiters_that_give_up_leave_the_line(db_url: str) -> None:
    manager = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=0, pool_timeout=0.3),
        application_name="trawler-test-fair",
    )
    release = asyncio.Event()

    async def hold() -> None:
        async with manager.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await release.wait()

    async def use() -> int:
        async with manager.engine.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    try:
        holder = asyncio.create_task(hold())
        while manager.pool_status()["checked_out"] == 0:
            await asyncio.sleep(0.01)
        cancelled = asyncio.create_task(use())
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(sa_exc.TimeoutError):
            await use()  # waits 0.3 s in line, then gives up
        release.set()
        await holder
        assert await asyncio.wait_for(use(), 1.0) == 1
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        status = manager.pool_status()
        assert status["checked_out"] == 0
        assert status["timeouts"] == 1
        assert status["connects"] == 1
    finally:
        await manager.dispose()


async def test_driver_reads_behind_pgbouncer_run_in_a_transaction(db_url: str) -> None:
    manager = ConnectionManager(
        make_settings(db_url, pgbouncer=True), application_name="trawler-test-driver"
    )
    try:
        async with manager.driver() as conn:
            assert conn.is_in_transaction()
            assert await conn.fetchval("SELECT 1") == 1
        async with manager.driver() as conn:  # the same connection, back out of it
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await manager.dispose()


async def test_driver_connection_cancelled_mid_statement_is_replaced(
    single: ConnectionManager,
) -> None:
    async def sleep() -> None:
        async with single.driver() as conn:
            await conn.execute("SELECT pg_sleep(5)")

    task = asyncio.create_task(sleep())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert single.metrics.invalidations >= 1  # not handed out again mid-statement
    async with single.driver() as conn:
        assert await conn.fetchval("SELECT 1") == 1
    assert single.pool_status()["checked_out"] == 0


async def test_overflow_connections_linger_until_the_load_has_gone(db_url: str) -> None:
    """A load that needs the overflow keeps its connections (no close and reconnect on
    every return); once no more than pool_size were in use for overflow_idle_s, returned
    surplus connections are closed, one per return."""
    db = ConnectionManager(
        make_settings(db_url, pool_size=1, max_overflow=2, pool_overflow_idle_s=0.3),
        application_name="trawler-test-overflow",
    )

    async def use(n: int) -> None:
        async def one() -> None:
            async with db.driver() as driver:
                await driver.execute("SELECT pg_sleep(0.05)")

        await asyncio.gather(*(one() for _ in range(n)))

    try:
        await use(3)
        assert db.metrics.connects == 3
        status = db.pool_status()
        assert (status["size"], status["checked_in"], status["overflow"]) == (1, 3, 2)
        for _ in range(3):  # busy again and again: the same three connections
            await use(3)
        assert db.metrics.connects == 3
        await asyncio.sleep(0.4)  # the overflow unneeded for longer than 0.3 s
        await use(1)
        assert db.pool_status()["checked_in"] == 2  # the returned surplus one was closed
        await use(1)
        await use(1)
        status = db.pool_status()
        assert (status["checked_in"], status["overflow"]) == (1, 0)  # down to pool_size
        await use(3)  # a new burst opens what it needs again
        assert db.metrics.connects == 5
    finally:
        await db.dispose()
