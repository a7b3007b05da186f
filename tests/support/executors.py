"""In-process executors for integration tests: started here, stopped by the fixture."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.database.connection import ConnectionManager
from app.utils.executor import AsyncJobExecutor


async def start_executor(
    settings: Settings, started: list[AsyncJobExecutor], **kwargs: Any
) -> AsyncJobExecutor:
    """An AsyncJobExecutor on its own pool (as a worker process has), appended to `started`."""
    ex = AsyncJobExecutor(
        ConnectionManager(settings, application_name="trawler-worker"), settings, **kwargs
    )
    await ex.start()
    started.append(ex)
    return ex


async def stop_all(started: list[AsyncJobExecutor]) -> None:
    for ex in started:
        await ex.stop(grace=1.0)
        await ex.db.dispose()
