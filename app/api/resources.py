"""Per-process API resources created on first use and kept on app.state: the shared HTTP
Fetcher (preview), the SSRF guard, the LISTEN connection, the job event hub (SSE) and the
executors' wake-up after submissions (TaskWaker).

Each registers its close in `app.state.cleanups`, which the lifespan in app.main runs at
shutdown (last registered first, before the database is disposed). Creation is
synchronous, so two concurrent first requests cannot create two of anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from app.config import Settings
from app.database.listener import PgListener
from app.scraper.fetch import Fetcher
from app.scraper.ssrf import SSRFGuard
from app.services.events import JobEventHub
from app.services.wakeups import TaskWaker

Cleanup = Callable[[], Awaitable[None]]


def add_cleanup(app: FastAPI, cleanup: Cleanup) -> None:
    cleanups: list[Cleanup] | None = getattr(app.state, "cleanups", None)
    if cleanups is None:
        cleanups = []
        app.state.cleanups = cleanups
    cleanups.append(cleanup)


async def run_cleanups(app: FastAPI) -> None:
    """Close every registered resource, newest first; the state forgets them all."""
    cleanups: list[Cleanup] = getattr(app.state, "cleanups", None) or []
    app.state.cleanups = []
    for name in ("fetcher", "ssrf_guard", "pg_listener", "job_events", "task_waker"):
        if hasattr(app.state, name):
            delattr(app.state, name)
    for cleanup in reversed(cleanups):
        await cleanup()


def _settings(app: FastAPI) -> Settings:
    settings: Settings = app.state.settings
    return settings


def _cached(app: FastAPI, name: str) -> Any:
    return getattr(app.state, name, None)


def get_guard(app: FastAPI) -> SSRFGuard:
    guard: SSRFGuard | None = _cached(app, "ssrf_guard")
    if guard is None:
        settings = _settings(app)
        guard = SSRFGuard(
            allow_private=settings.allow_private_networks, allow_cidrs=settings.allowed_cidrs
        )
        app.state.ssrf_guard = guard
    return guard


def get_fetcher(app: FastAPI) -> Fetcher:
    fetcher: Fetcher | None = _cached(app, "fetcher")
    if fetcher is None:
        settings = _settings(app)
        fetcher = Fetcher(
            user_agent=settings.user_agent,
            max_body_bytes=settings.max_body_bytes,
            max_redirects=settings.max_redirects,
            guard=get_guard(app),
        )
        app.state.fetcher = fetcher
        add_cleanup(app, fetcher.close)
    return fetcher


def get_listener(app: FastAPI) -> PgListener:
    """The process's one LISTEN connection (started; off behind PgBouncer)."""
    listener: PgListener | None = _cached(app, "pg_listener")
    if listener is None:
        settings = _settings(app)
        assert settings.database_url is not None
        listener = PgListener(
            settings.database_url,
            enabled=not settings.pgbouncer,
            application_name="trawler-api-listener",
        )
        listener.start()
        app.state.pg_listener = listener
        add_cleanup(app, listener.stop)
    return listener


def get_job_events(app: FastAPI) -> JobEventHub:
    hub: JobEventHub | None = _cached(app, "job_events")
    if hub is None:
        hub = JobEventHub(get_listener(app))
        app.state.job_events = hub

        async def close() -> None:
            hub.close()

        add_cleanup(app, close)
    return hub


def get_task_waker(app: FastAPI) -> TaskWaker:
    waker: TaskWaker | None = _cached(app, "task_waker")
    if waker is None:
        waker = TaskWaker(app.state.db)
        app.state.task_waker = waker
        add_cleanup(app, waker.settle)
    return waker


async def _guard_dep(request: Request) -> SSRFGuard:
    return get_guard(request.app)


async def _fetcher_dep(request: Request) -> Fetcher:
    return get_fetcher(request.app)


async def _job_events_dep(request: Request) -> JobEventHub:
    return get_job_events(request.app)


async def _task_waker_dep(request: Request) -> TaskWaker:
    return get_task_waker(request.app)


GuardDep = Annotated[SSRFGuard, Depends(_guard_dep)]
TaskWakerDep = Annotated[TaskWaker, Depends(_task_waker_dep)]
FetcherDep = Annotated[Fetcher, Depends(_fetcher_dep)]
JobEventsDep = Annotated[JobEventHub, Depends(_job_events_dep)]
