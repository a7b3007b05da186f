"""Running the executor: inside `trawler serve` (a lifespan hook) or alone (`trawler worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from app.config import Settings
from app.database.connection import ConnectionManager
from app.utils.executor import AsyncJobExecutor

if TYPE_CHECKING:
    # only `trawler serve` runs the executor inside the app; `trawler worker` has no FastAPI
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


def executor_hook(
    settings: Settings,
) -> Callable[[FastAPI], Awaitable[Callable[[], Awaitable[None]]]]:
    """A lifespan hook for create_app(hooks=[...]): start the executor, return its stopper."""

    async def hook(app: FastAPI) -> Callable[[], Awaitable[None]]:
        resolved: Settings = app.state.settings
        # its own pool and application_name, so pg_stat_activity tells API from worker
        db = ConnectionManager(resolved, application_name="trawler-worker")
        executor = AsyncJobExecutor(db, resolved)
        await executor.start()
        app.state.executor = executor

        async def stop() -> None:
            try:
                await executor.stop()
            finally:
                await db.dispose()

        return stop

    del settings
    return hook


async def run_worker(db: ConnectionManager, *, concurrency: int | None = None) -> int:
    """Run an executor until SIGTERM/SIGINT or a drain request; returns the exit status."""
    worker_db = ConnectionManager(db.settings, application_name="trawler-worker")
    executor = AsyncJobExecutor(worker_db, db.settings, concurrency=concurrency)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, executor.request_stop)
    try:
        await executor.run_forever()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await worker_db.dispose()
    if executor.crashed is not None:
        logger.error("worker stopped after an internal error: %s", executor.crashed)
        return 1
    return 0
