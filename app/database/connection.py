"""ConnectionManager: the async engine, its monitored pool, health probe and session scopes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

from app.config import Settings

logger = logging.getLogger(__name__)


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
    """Queue pool that times every checkout wait and counts pool timeouts."""

    metrics: PoolMetrics | None = None

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        try:
            return super()._do_get()
        except exc.TimeoutError:
            if self.metrics is not None:
                self.metrics.timeouts += 1
            raise
        finally:
            if self.metrics is not None:
                self.metrics.record_wait(time.perf_counter() - started)

    def recreate(self) -> MonitoredPool:
        # engine.dispose() builds a fresh pool through recreate(): keep the same counters
        new = super().recreate()
        assert isinstance(new, MonitoredPool)
        new.metrics = self.metrics
        return new


class DatabaseUnavailable(Exception):
    """The database did not answer in time or refused the connection."""


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
            # transaction-mode poolers break server-side prepared statements
            connect_args["statement_cache_size"] = 0
            connect_args["prepared_statement_cache_size"] = 0
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            poolclass=MonitoredPool,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle,
            pool_pre_ping=True,
            connect_args=connect_args,
        )
        pool = self.engine.sync_engine.pool
        assert isinstance(pool, MonitoredPool)
        pool.metrics = self.metrics
        self._install_pool_events()
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    def _install_pool_events(self) -> None:
        metrics = self.metrics
        target = self.engine.sync_engine

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

    async def health_check(self, *, limit: float | None = None) -> dict[str, Any]:
        """SELECT 1 under a hard timeout. Raises DatabaseUnavailable; never hangs."""
        limit = limit if limit is not None else self.settings.health_timeout
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit), self.engine.connect() as conn:
                version = (await conn.execute(text("SHOW server_version"))).scalar_one()
        except TimeoutError as error:
            raise DatabaseUnavailable(f"database did not answer within {limit:g}s") from error
        except (OSError, exc.DBAPIError, exc.TimeoutError) as error:
            raise DatabaseUnavailable(f"database unreachable: {_short(error)}") from error
        return {
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "server_version": str(version),
        }

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit on success, roll back on any exception."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A Core connection inside one transaction (hot paths: claim, complete, COPY)."""
        async with self.engine.begin() as conn:
            yield conn

    async def dispose(self) -> None:
        await self.engine.dispose()


def _short(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    text_ = message[0] if message else type(error).__name__
    return text_[:200]
