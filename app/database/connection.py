"""ConnectionManager: the async engine, its monitored pool, health probe and session scopes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import asyncpg
from sqlalchemy import event, exc, text, util
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import queue as sqla_queue
from sqlalchemy.util.concurrency import await_, greenlet_spawn

from app.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


@dataclass
class PoolMetrics:
    """Counters fed by pool events and by the monitored pool's checkout path."""

    connects: int = 0
    checkouts: int = 0
    checkins: int = 0
    invalidations: int = 0
    timeouts: int = 0
    # recent checkout wait times in seconds (bounded ring, so percentiles stay cheap)
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def record_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def wait_percentiles_ms(self) -> dict[str, float]:
        ordered = sorted(self.waits)
        return {
            "p50": round(_percentile(ordered, 0.50) * 1000, 3),
            "p99": round(_percentile(ordered, 0.99) * 1000, 3),
            "max": round((ordered[-1] if ordered else 0.0) * 1000, 3),
        }


class MonitoredPool(AsyncAdaptedQueuePool):
    """Queue pool that hands connections over first come, first served, times every
    checkout wait and counts pool timeouts.

    The stock asyncio queue pool lets a new checkout take a connection that was just
    returned for a waiter that has not run yet; the waiter goes back to the end of the line
    (asyncio.Queue re-queues it), and returns that find the idle queue full close their
    connection while others wait for one. Under more concurrent requests than connections
    that gives second-long tail latencies and reconnects (each a new server process, and
    milliseconds of connect work here). So here a returned connection goes straight to the
    oldest waiter, nobody overtakes a waiter, and a connection slot freed by a close or a
    failed connect is offered to the first waiter, who opens the connection itself.

    Overflow connections (beyond pool_size) are not closed as soon as one comes back to an
    idle pool either: under a load that swings around pool_size that closed and reopened
    connections all the time (bench/api.py: 126 connects in a run, 20 with none). A
    returned one is closed only once no more than pool_size connections have been in use
    for `overflow_idle_s`; until then it waits in the idle queue, which is last in, first
    out, so the surplus is what stays unused.
    """

    metrics: PoolMetrics | None = None
    overflow_idle_s: float = 30.0

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._size = self._pool.maxsize
        # the idle queue has room for the overflow connections too
        self._pool = self._queue_class(self._size + max(0, self._max_overflow), use_lifo=True)
        self._busy_at = time.monotonic()  # the last time more than _size were checked out
        # futures of waiting checkouts, oldest first; each gets a pool entry or None
        # (None: a connection slot is free, open one)
        self._waiters: deque[asyncio.Future[ConnectionPoolEntry | None]] = deque()

    def size(self) -> int:
        return self._size

    def checkedout(self) -> int:
        return self._size - self._pool.qsize() + self._overflow

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        try:
            entry = self._fair_get()
            if self._overflow > 0 and self.checkedout() > self._size:
                self._busy_at = time.monotonic()
            return entry
        except exc.TimeoutError:
            if self.metrics is not None:
                self.metrics.timeouts += 1
            raise
        finally:
            if self.metrics is not None:
                self.metrics.record_wait(time.perf_counter() - started)

    def _fair_get(self) -> ConnectionPoolEntry:
        first = False  # woken for a freed slot: wait at the front if someone else took it
        if not self._waiters:
            try:
                return self._pool.get(False)
            except sqla_queue.Empty:
                pass
        while True:
            if (first or not self._waiters) and self._inc_overflow():
                try:
                    return self._create_connection()
                except BaseException:
                    with util.safe_reraise():
                        self._dec_overflow()
            try:
                entry = await_(self._wait_in_line(first=first))
            except TimeoutError:
                raise exc.TimeoutError(
                    f"QueuePool limit of size {self.size()} overflow {self._max_overflow} "
                    f"reached, connection timed out, timeout {self._timeout:0.2f}",
                    code="3o7r",
                ) from None
            if entry is not None:
                return entry
            first = True

    async def _wait_in_line(self, *, first: bool) -> ConnectionPoolEntry | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ConnectionPoolEntry | None] = loop.create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        # a plain timer, not asyncio.timeout(): this runs for most checkouts under load
        timer = loop.call_later(self._timeout, _expire, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # handed a connection (or a slot) just as we gave up: pass it on
                self._pass_on(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        finally:
            timer.cancel()

    def _pass_on(self, entry: ConnectionPoolEntry | None) -> None:
        """A connection (or a free slot: None) to the oldest waiter, else back to idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(entry)
                return
        if entry is None:
            return
        if self._overflow > 0 and time.monotonic() - self._busy_at > self.overflow_idle_s:
            try:
                entry.close()  # a surplus connection, unneeded for a while
            finally:
                self._dec_overflow()
        else:
            super()._do_return_conn(entry)  # the idle queue

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        self._pass_on(record)

    def _dec_overflow(self) -> Literal[True]:
        super()._dec_overflow()
        self._pass_on(None)
        return True

    def recreate(self) -> MonitoredPool:
        # engine.dispose() builds a fresh pool through recreate(): the same size (the
        # parent would take the idle queue's capacity) and the same counters
        new = MonitoredPool(
            self._creator,
            pool_size=self._size,
            max_overflow=self._max_overflow,
            pre_ping=self._pre_ping,
            timeout=self._timeout,
            recycle=self._recycle,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )
        new.metrics = self.metrics
        new.overflow_idle_s = self.overflow_idle_s
        return new


def _release(pooled: PoolProxiedConnection, invalidate: bool) -> None:
    if invalidate:
        pooled.invalidate()
    pooled.close()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class DatabaseUnavailable(Exception):
    """The database did not answer in time or refused the connection."""


class StaleConnection(DatabaseUnavailable):
    """A pooled connection turned out dead as its statement started, and nothing was sent.

    The server ended it while it sat idle (a terminated backend, a restart): asyncpg had
    read the server's last message (the FATAL error, which leaves its protocol waiting for
    a sync that never comes) but not yet the socket's close, so neither the checkout nor
    `is_closed()` could tell. asyncpg then refuses to start the statement. Another
    connection may be tried at once.
    """


# asyncpg's refusal to start a statement while its protocol consumes an error
# (PROTOCOL_ERROR_CONSUME = 2); other states in this message would mean real concurrent
# use of one connection, a bug that must not be retried away
_ERROR_CONSUME = "another operation (2) is in progress"


def _left_consuming_an_error(error: BaseException) -> bool:
    return isinstance(error, asyncpg.InternalClientError) and _ERROR_CONSUME in str(error)


# Errors that mean "the database is not reachable right now", not "the code is wrong".
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    DatabaseUnavailable,
    exc.TimeoutError,  # pool checkout timed out
    exc.OperationalError,
    exc.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,  # the server is shutting down (57P01)
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def is_unavailable(error: BaseException) -> bool:
    """True for outage-type failures (retry later), False for bugs and bad data."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, exc.DBAPIError) and not isinstance(
        error, exc.OperationalError | exc.InterfaceError
    ):
        # a statement error (constraint, syntax): a bug or bad data, not an outage
        # (the driver's own exception, e.g. CannotConnectNowError, is the adapted one's cause)
        orig = error.orig
        return isinstance(orig, UNAVAILABLE_ERRORS) or isinstance(
            getattr(orig, "__cause__", None), UNAVAILABLE_ERRORS
        )
    return isinstance(error, UNAVAILABLE_ERRORS)


class ConnectionManager:
    """One per process: owns the engine, the session factory and the pool metrics."""

    def __init__(self, settings: Settings, *, application_name: str = "trawler-api") -> None:
        if settings.database_url is None:
            raise ValueError("database_url is not set (start the embedded database first)")
        self.settings = settings
        self.url = settings.database_url
        self.application_name = application_name
        self.metrics = PoolMetrics()
        connect_args: dict[str, Any] = {
            "timeout": settings.db_connect_timeout,
            "command_timeout": settings.db_command_timeout,
            "server_settings": {"application_name": application_name},
        }
        if settings.pgbouncer:
            # Transaction-mode poolers hand each transaction to any server connection:
            # no statement caches, and the statements SQLAlchemy still prepares get unique
            # names so two clients never collide on "__asyncpg_stmt_1__" (SQLAlchemy's
            # documented PgBouncer set-up; PgBouncer should DISCARD ALL on release).
            connect_args["statement_cache_size"] = 0
            connect_args["prepared_statement_cache_size"] = 0
            connect_args["prepared_statement_name_func"] = _unique_statement_name
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            poolclass=MonitoredPool,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle,
            # pre-ping semantics with a cheaper ping: see _ping_on_checkout
            pool_pre_ping=False,
            connect_args=connect_args,
        )
        pool = self.engine.sync_engine.pool
        assert isinstance(pool, MonitoredPool)
        pool.metrics = self.metrics
        pool.overflow_idle_s = settings.pool_overflow_idle_s
        self._install_pool_events()
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self._inflight: dict[str, asyncio.Task[Any]] = {}

    def _install_pool_events(self) -> None:
        metrics = self.metrics
        target = self.engine.sync_engine
        # first: a checkout whose ping fails is retried on a fresh connection before any
        # other checkout listener sees it
        event.listen(target, "connect", _mark_fresh)
        event.listen(target, "checkout", _checkout_check(self.settings.pool_ping_idle_s))
        event.listen(target, "checkin", _mark_idle)

        @event.listens_for(target, "connect")
        def _on_connect(*_: Any) -> None:
            metrics.connects += 1

        @event.listens_for(target, "checkout")
        def _on_checkout(*_: Any) -> None:
            metrics.checkouts += 1

        @event.listens_for(target, "checkin")
        def _on_checkin(*_: Any) -> None:
            metrics.checkins += 1

        @event.listens_for(target, "invalidate")
        def _on_invalidate(*_: Any) -> None:
            metrics.invalidations += 1

        @event.listens_for(target, "soft_invalidate")
        def _on_soft_invalidate(*_: Any) -> None:
            metrics.invalidations += 1

    def pool_status(self) -> dict[str, Any]:
        pool = self.engine.sync_engine.pool
        assert isinstance(pool, MonitoredPool)
        m = self.metrics
        return {
            "size": pool.size(),
            "checked_out": pool.checkedout(),
            "checked_in": pool.checkedin(),
            "overflow": max(0, pool.overflow()),
            "max_overflow": self.settings.max_overflow,
            "timeout_s": self.settings.pool_timeout,
            "connects": m.connects,
            "checkouts": m.checkouts,
            "checkins": m.checkins,
            "invalidations": m.invalidations,
            "timeouts": m.timeouts,
            "wait_ms": m.wait_percentiles_ms(),
        }

    async def bounded(
        self,
        key: str,
        work: Callable[[AsyncConnection], Awaitable[T]],
        *,
        limit: float,
    ) -> T:
        """Run `work` on a pooled connection; answer within `limit` seconds, whatever happens.

        asyncio.timeout alone is not enough: when a query is cancelled on a connection that
        stopped answering, SQLAlchemy first tries a graceful close (up to 2 s, shielded)
        before the cancellation reaches the caller. So the work runs in its own task;
        on timeout the caller gets DatabaseUnavailable at once and the task is torn down in
        the background. Callers with the same `key` share one in-flight task (so one key must
        always name the same work), and a storm of probes during an outage holds at most
        one connection per key.
        Raises DatabaseUnavailable for outage-type errors; other errors propagate.
        """
        task = self._inflight.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._on_connection(work), name=f"trawler-db-{key}")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._inflight_done, key))
        # asyncio.wait never cancels the shared task when this caller is cancelled
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done or task.cancelled():
            task.cancel()
            raise DatabaseUnavailable(f"database did not answer within {limit:g}s")
        result: T = task.result()
        return result

    async def _on_connection(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        try:
            async with self.engine.connect() as conn:
                return await work(conn)
        except Exception as error:
            if is_unavailable(error):
                raise DatabaseUnavailable(f"database unreachable: {_short(error)}") from error
            raise

    def _inflight_done(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            # retrieved here so a probe nobody waited for does not warn at shutdown
            logger.debug("db task %s failed: %s", key, task.exception())

    async def health_check(self, *, limit: float | None = None) -> dict[str, Any]:
        """SELECT 1 under a hard timeout. Raises DatabaseUnavailable; never hangs."""
        started = time.perf_counter()
        limit = limit if limit is not None else self.settings.health_timeout

        async def _version(conn: AsyncConnection) -> str:
            return str((await conn.execute(text("SHOW server_version"))).scalar_one())

        try:
            version = await self.bounded("health", _version, limit=limit)
        except exc.DBAPIError as error:
            # reachable but refusing us (unknown database, role, password): not healthy either
            raise DatabaseUnavailable(f"database unusable: {_short(error)}") from error
        return {
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "server_version": version,
        }

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit on success, roll back on any exception."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                try:
                    await session.rollback()
                except Exception:
                    # the connection is usually gone too (outage): the first error is the
                    # one the caller must see, so log this one and re-raise that
                    logger.warning("rollback after a failed unit of work failed", exc_info=True)
                raise

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A Core connection inside one transaction (hot paths: claim, complete, COPY)."""
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[asyncpg.Connection]:
        """The asyncpg connection of a pooled connection, for one-statement reads on hot
        paths (GET /jobs/{id}).

        Checked out (and checked) like any other, but outside any transaction: each statement
        is its own (autocommit, no BEGIN/COMMIT round trips), prepared once per connection
        by asyncpg's statement cache, with none of SQLAlchemy's per-statement work. Use it
        only for a single read; writes and reads that must agree go through session() or
        connect(). Behind PgBouncer the statement runs in a transaction: with the statement
        cache off there, asyncpg prepares unnamed statements, which must stay on the one
        server connection a transaction pins.
        """
        token = _ONE_STATEMENT.set(True)
        try:
            pooled = await self.engine.raw_connection()
        finally:
            _ONE_STATEMENT.reset(token)
        driver: asyncpg.Connection = pooled.driver_connection
        invalidate = False
        try:
            if self.settings.pgbouncer:
                async with driver.transaction():
                    yield driver
            else:
                yield driver
        except BaseException as error:
            # dead, or interrupted mid-statement (cancelled): never hand it out again;
            # after any other error, ping it at its next checkout
            stale = _left_consuming_an_error(error)
            invalidate = stale or driver.is_closed() or not isinstance(error, Exception)
            mark_suspect(pooled)
            if stale:
                raise StaleConnection(f"connection found dead: {error}") from error
            raise
        finally:
            await greenlet_spawn(_release, pooled, invalidate)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        """One autocommit read on a driver connection (see driver()); a connection found
        dead as the statement started (StaleConnection: nothing was sent) is replaced and
        the read made once more on another."""
        try:
            async with self.driver() as driver:
                return await driver.fetchrow(query, *args)
        except StaleConnection:
            logger.info("a pooled connection was found dead; reading on another")
        async with self.driver() as driver:
            return await driver.fetchrow(query, *args)

    async def dispose(self) -> None:
        pending = list(self._inflight.values())
        for task in pending:
            task.cancel()
        # let cancelled probes finish tearing their connections down before the pool goes
        await asyncio.gather(*pending, return_exceptions=True)
        await self.engine.dispose()


_FRESH = "trawler_fresh"
_IDLE_SINCE = "trawler_idle_since"  # monotonic time of the last clean check-in
_SUSPECT = "trawler_suspect"  # the last use ended in an error: ping at the next checkout
_PING_SQL = "SELECT 1"


def _mark_fresh(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info[_FRESH] = True


def _mark_idle(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    if record.info.pop(_SUSPECT, False):
        record.info.pop(_IDLE_SINCE, None)
    else:
        record.info[_IDLE_SINCE] = time.monotonic()


def mark_suspect(pooled: PoolProxiedConnection) -> None:
    """The use of this checked-out connection failed (a timeout, say) without closing it:
    its next checkout pings it, however recently it was used."""
    pooled.info[_SUSPECT] = True


async def _ping_statement(driver_connection: asyncpg.Connection) -> None:
    # simple query protocol (no arguments): one round trip, nothing prepared
    await driver_connection.execute(_PING_SQL)


# set by ConnectionManager.driver() around its checkout: a caller that runs one
# autocommitting statement and answers a dead connection with a 503 may skip the ping of a
# recently used connection (every other checkout is pinged, as with pool_pre_ping)
_ONE_STATEMENT: ContextVar[bool] = ContextVar("trawler_one_statement", default=False)


def _checkout_check(ping_idle_s: float) -> Callable[[Any, ConnectionPoolEntry, Any], None]:
    """The pessimistic liveness check of a checkout (pool_pre_ping), at most one round trip.

    SQLAlchemy's own pre-ping on asyncpg wraps its `;` in BEGIN ... ROLLBACK whenever the
    connection is outside a transaction, which at checkout it always is: three round trips
    per request, more than a hot read's own work. Here:

    - a connection created for this checkout is not checked (as with pool_pre_ping);
    - one the driver already knows to be closed (the server ended it: a restart, a
      terminated backend; asyncpg sees the socket close as it happens) is refused without
      a round trip;
    - for a one-statement checkout (ConnectionManager.driver(): the hot paths, GET
      /jobs/{id} and the submissions), one checked in cleanly less than `ping_idle_s` ago
      is handed out as it is, like HikariCP's alive-bypass window: under load a connection
      comes back every few milliseconds, and its ping was ~15% of a submission's CPU, API
      and database together (bench/api.py);
    - any other is pinged with a `SELECT 1` on the simple query protocol (one round trip,
      nothing prepared, so PgBouncer's transaction mode is fine).

    A dead connection invalidates the pool (every connection older than it is replaced at
    its next checkout, as after a server restart) and the pool retries the checkout on a
    new connection, so the caller never sees it. What the window gives up, on the hot
    paths only: a connection that died within it without the driver noticing yet (the
    socket's close not read yet, a partition that drops packets silently) fails that one
    request's statement, a 503, instead of being replaced first (a read through
    fetchrow() whose statement asyncpg refused to start is made again on another).
    """

    def check(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        info = record.info
        if info.pop(_FRESH, False):
            return
        driver = dbapi_connection.driver_connection
        if driver.is_closed():
            raise exc.InvalidatePoolError("connection found closed on checkout")
        idle_since = info.pop(_IDLE_SINCE, None)
        if (
            idle_since is not None
            and time.monotonic() - idle_since < ping_idle_s
            and _ONE_STATEMENT.get()
        ):
            return
        try:
            dbapi_connection.run_async(_ping_statement)
        except Exception as error:
            if driver.is_closed():
                raise exc.InvalidatePoolError(
                    f"connection found dead on checkout: {error}"
                ) from error
            raise

    return check


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def _short(error: BaseException) -> str:
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        error = error.orig  # drop SQLAlchemy's "(dialect.Error)" prefix and SQL echo
    message = str(error).strip().splitlines()
    text_ = message[0] if message else type(error).__name__
    return text_[:200]
