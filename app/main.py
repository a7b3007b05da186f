"""create_app(): the FastAPI application and its lifespan (database, migrations, executor)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.errors import install_error_handlers
from app.api.hot_paths import HotPathMiddleware
from app.api.resources import run_cleanups
from app.api.routes import (
    admin,
    export,
    firecrawl,
    health,
    jobs,
    metrics,
    schedules,
    scraper,
    webhooks,
)
from app.config import Settings, get_settings
from app.database.connection import ConnectionManager, is_unavailable
from app.database.embedded import resolve_database_url
from app.database.migrations import upgrade_to_head
from app.services.metrics import HttpMetrics, ObservabilityMiddleware
from app.ui import STATIC_PREFIX as UI_STATIC_PREFIX
from app.ui import router as ui_router
from app.ui import static_files as ui_static_files

logger = logging.getLogger(__name__)

# Hooks run after the database is ready and before shutdown; the executor plugs in here.
LifespanHook = Callable[[FastAPI], Awaitable[Callable[[], Awaitable[None]]]]


async def migrate_with_retry(db: ConnectionManager, attempts: int = 10) -> str | None:
    """Migrations run on start; a database still booting gets a few seconds to come up.

    Returns the revision now current. Only outage-type errors are retried; a broken
    migration or a wrong password fails at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await upgrade_to_head(db.engine)
        except Exception as error:
            if attempt == attempts or not is_unavailable(error):
                raise
            logger.warning("database not reachable yet (%s); retrying", error)
            await asyncio.sleep(min(0.5 * attempt, 3.0))
    raise AssertionError("unreachable")


def freeze_startup_objects() -> None:
    """Exempt everything that exists once the app is up from future garbage collections.

    Modules, routes, schemas, the engine: a few hundred thousand long-lived objects that
    every full collection would otherwise scan again. Under load a full collection came
    every ~2 s and stopped the event loop ~85 ms each time (measured by bench/api.py),
    which is what the p99 latency was made of. Garbage is collected first, so only live
    objects are frozen.
    """
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    *,
    migrate: bool = True,
    hooks: list[LifespanHook] | None = None,
    db: ConnectionManager | None = None,
) -> FastAPI:
    """Build the app. With `db` given (the CLI's `serve`), the lifespan uses that manager and
    leaves starting/stopping the database and disposing the engine to its owner."""
    base_settings = db.settings if db is not None else (settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the exit stack unwinds in reverse and runs every step even when one fails
        async with AsyncExitStack() as stack:
            if db is None:
                resolved, embedded = await resolve_database_url(base_settings)
                if embedded is not None:
                    stack.push_async_callback(asyncio.to_thread, embedded.stop)
                manager = ConnectionManager(resolved, application_name="trawler-api")
                stack.push_async_callback(manager.dispose)
            else:
                manager = db
            app.state.settings = manager.settings
            app.state.db = manager
            if migrate:
                await migrate_with_retry(manager)
            # resources created on first use (app.api.resources: fetcher, LISTEN
            # connection) register their close in app.state.cleanups; they run first at
            # shutdown, before the hooks' stoppers
            app.state.cleanups = []
            for hook in hooks or []:
                stack.push_async_callback(await hook(app))
            stack.push_async_callback(run_cleanups, app)
            freeze_startup_objects()
            yield

    app = FastAPI(
        title="Trawler",
        version=__version__,
        description="PostgreSQL-native asynchronous scraping job backend",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # request ids (logging context, X-Request-ID) and HTTP latency by route for /metrics
    app.state.http_metrics = HttpMetrics()
    # the hottest routes (GET /api/v1/jobs/{id}, POST /api/v1/scrape and /crawl) answered
    # before routing; inside the request ids and metrics (the last added is the outermost)
    app.add_middleware(HotPathMiddleware)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.http_metrics)
    app.include_router(health.router)
    app.include_router(scraper.router)
    app.include_router(jobs.router)
    app.include_router(webhooks.router)
    app.include_router(schedules.router)
    app.include_router(export.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    # Firecrawl-compatible API at /v1 and /v2 (its SDKs drop any path prefix)
    app.include_router(firecrawl.router)
    # the web dashboard at /ui (server-rendered; its vendored files at /ui/static)
    app.include_router(ui_router)
    app.mount(UI_STATIC_PREFIX, ui_static_files(), name="ui-static")
    return app
