"""One LISTEN connection per process, shared by every subscriber, reconnecting by itself.

asyncpg delivers notifications on a dedicated connection outside the pool (a pooled
connection would be handed to other work between notifications). When the database is
unreachable the listener retries with backoff; callers keep a polling fallback, so a lost
notification costs latency, never correctness. Behind PgBouncer in transaction mode LISTEN
does not work: `Settings.pgbouncer` turns the listener off and callers only poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

Callback = Callable[[str, str], None]  # (channel, payload)


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


class PgListener:
    def __init__(self, url: str, *, enabled: bool = True, application_name: str = "") -> None:
        self._dsn = asyncpg_dsn(url)
        self._enabled = enabled
        self._app_name = application_name or "trawler-listener"
        self._subs: dict[str, set[Callback]] = defaultdict(set)
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()

    def subscribe(self, channel: str, callback: Callback) -> Callable[[], None]:
        self._subs[channel].add(callback)
        if self._conn is not None and len(self._subs[channel]) == 1:
            asyncio.get_running_loop().create_task(self._listen(channel))
        return lambda: self._subs[channel].discard(callback)

    def start(self) -> None:
        if self._enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pg-listener")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for callback in list(self._subs.get(channel, ())):
            try:
                callback(channel, payload)
            except Exception:
                logger.exception("notification handler failed on %s", channel)

    async def _listen(self, channel: str) -> None:
        if self._conn is not None:
            await self._conn.add_listener(channel, self._dispatch)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self._conn = await asyncpg.connect(
                    self._dsn, timeout=5, server_settings={"application_name": self._app_name}
                )
                lost = asyncio.Event()
                self._conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                for channel in list(self._subs):
                    await self._listen(channel)
                self.connected.set()
                delay = 0.5
                # a keepalive query notices a half-open connection (cut network) quickly
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=5)
                    if not lost.is_set():
                        await asyncio.wait_for(self._conn.execute("SELECT 1"), timeout=5)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.warning("LISTEN connection lost (%s); retrying in %.1fs", error, delay)
            await self._close()
            # missed notifications while disconnected: wake everyone so they poll once
            for channel in list(self._subs):
                self._dispatch(None, 0, channel, "")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            delay = min(delay * 2, 10.0)
