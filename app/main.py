"""create_app(): the FastAPI application and its lifespan (database, migrations, executor)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.errors import install_error_handlers
from app.api.routes import health
from app.config import Settings, get_settings
from app.database.connection import ConnectionManager, DatabaseUnavailable
from app.database.embedded import EmbeddedPostgres
from app.database.migrations import upgrade_to_head

logger = logging.getLogger(__name__)

# Hooks run after the database is ready and before shutdown; the executor plugs in here.
LifespanHook = Callable[[FastAPI], Awaitable[Callable[[], Awaitable[None]]]]


async def resolve_database_url(settings: Settings) -> tuple[Settings, EmbeddedPostgres | None]:
    """With no URL configured, start the embedded PostgreSQL and point the settings at it."""
    if settings.database_url is not None:
        return settings, None
    embedded = EmbeddedPostgres(settings.data_dir)
    # pgserver spawns and waits on subprocesses: keep that off the event loop
    url = await asyncio.to_thread(embedded.start)
    return settings.model_copy(update={"database_url": Settings(database_url=url).database_url}), (
        embedded
    )


async def migrate_with_retry(db: ConnectionManager, attempts: int = 10) -> None:
    """Migrations run on start; a database still booting gets a few seconds to come up."""
    for attempt in range(1, attempts + 1):
        try:
            await upgrade_to_head(db.engine)
            return
        except (OSError, TimeoutError, DatabaseUnavailable) as error:
            if attempt == attempts:
                raise
            logger.warning("database not reachable yet (%s); retrying", error)
            await asyncio.sleep(min(0.5 * attempt, 3.0))


def create_app(
    settings: Settings | None = None,
    *,
    migrate: bool = True,
    hooks: list[LifespanHook] | None = None,
) -> FastAPI:
    base_settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved, embedded = await resolve_database_url(base_settings)
        db = ConnectionManager(resolved, application_name="trawler-api")
        app.state.settings = resolved
        app.state.db = db
        stoppers: list[Callable[[], Awaitable[None]]] = []
        try:
            if migrate:
                await migrate_with_retry(db)
            for hook in hooks or []:
                stoppers.append(await hook(app))
            yield
        finally:
            for stop in reversed(stoppers):
                await stop()
            await db.dispose()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)

    app = FastAPI(
        title="Trawler",
        version=__version__,
        description="PostgreSQL-native asynchronous scraping job backend",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    return app
