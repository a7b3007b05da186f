"""Executor wake-ups sent after the fact, coalesced: the API's submissions use them.

A transaction that has sent a NOTIFY takes a database-wide lock at commit and holds it
until its commit record is flushed, so concurrent submissions that each notify commit one
at a time (bench/submit_statement.py measures it). The API's submissions therefore commit
without one and call `TaskWaker.wake()`: at most one NOTIFY is in flight, and every wake()
that arrives meanwhile is answered by one more NOTIFY after it. Each submission is thus
followed by a NOTIFY sent after its commit, and under load one NOTIFY covers many.

The wake-up is a hint: executors also poll (TRAWLER_POLL_INTERVAL), so a NOTIFY lost to
a database outage or a process exit delays work by at most one poll, and loses nothing.
"""

from __future__ import annotations

import asyncio
import logging

from app.database.connection import ConnectionManager
from app.services.queue import NOTIFY_TASKS

logger = logging.getLogger(__name__)

_NOTIFY_SQL = f"SELECT pg_notify('{NOTIFY_TASKS}', '')"


class TaskWaker:
    def __init__(self, db: ConnectionManager) -> None:
        self._db = db
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  # NOTIFYs sent (tests, diagnostics)

    def wake(self) -> None:
        """Send NOTIFY trawler_tasks soon, after whatever this process committed so far."""
        self._wanted = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._send())
            self._task.add_done_callback(self._sent)

    async def _send(self) -> None:
        while self._wanted:
            self._wanted = False
            async with self._db.driver() as conn:
                await conn.execute(_NOTIFY_SQL)
            self.sent += 1

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # not fatal: the executors poll; the next wake() tries again
            logger.warning(
                "could not wake the executors (they find the work at their next poll): %s",
                error,
            )
        elif self._wanted:  # wanted again after the loop ended, before this callback
            self.wake()

    async def settle(self) -> None:
        """Wait for the wake-up in flight, if any (shutdown, tests)."""
        if self._task is not None:
            await asyncio.wait([self._task])
