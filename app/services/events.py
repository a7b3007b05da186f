"""Job progress streams: one LISTEN connection per process fanned out to every SSE stream.

`state.transition` NOTIFYs 'trawler_jobs' with "<job_id>:<status>" on commit. The hub
wakes the streams watching that job; each stream then re-reads the job row with a short
connection of its own. Progress counters change without notifications, and a LISTEN
connection can drop, so every stream also polls once a second: a lost notification
costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc

from app.api.schemas import JobPublic
from app.database.connection import UNAVAILABLE_ERRORS, ConnectionManager, is_unavailable
from app.database.listener import PgListener
from app.database.models import TERMINAL_JOB_STATUSES
from app.services.jobs import get_job
from app.services.state import NOTIFY_JOBS

logger = logging.getLogger(__name__)

_DB_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, sa_exc.DBAPIError)

POLL_INTERVAL_S = 1.0
HEARTBEAT_S = 15.0


class JobEventHub:
    """Fan-out of job status notifications to the streams watching each job."""

    def __init__(self, listener: PgListener) -> None:
        self._listener = listener
        self._watchers: dict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        self._unsubscribe = listener.subscribe(NOTIFY_JOBS, self._on_notify)

    @property
    def listener(self) -> PgListener:
        return self._listener

    @property
    def watchers(self) -> int:
        return sum(len(events) for events in self._watchers.values())

    def _on_notify(self, _channel: str, payload: str) -> None:
        job_text, _, _status = payload.partition(":")
        if not job_text:
            # the listener reconnected and may have missed notifications: wake everyone
            for events in self._watchers.values():
                for event in events:
                    event.set()
            return
        try:
            job_id = uuid.UUID(job_text)
        except ValueError:
            logger.warning("ignoring malformed %s payload %r", NOTIFY_JOBS, payload)
            return
        for event in self._watchers.get(job_id, ()):
            event.set()

    @contextmanager
    def watch(self, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set whenever the job's status may have changed."""
        event = asyncio.Event()
        self._watchers[job_id].add(event)
        try:
            yield event
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[job_id]

    def close(self) -> None:
        """Stop receiving notifications (the listener itself belongs to its creator)."""
        self._unsubscribe()


def _sse(event: str, job: JobPublic) -> bytes:
    return f"event: {event}\ndata: {job.model_dump_json()}\n\n".encode()


async def _read(db: ConnectionManager, tenant: str, job_id: uuid.UUID) -> JobPublic | None:
    # a connection per read: a stream may last hours and must not pin a pooled connection
    async with db.engine.connect() as conn:
        return await get_job(conn, tenant, job_id)


async def job_stream(
    db: ConnectionManager,
    hub: JobEventHub,
    tenant: str,
    job_id: uuid.UUID,
    *,
    is_disconnected: Callable[[], Awaitable[bool]],
    poll_s: float = POLL_INTERVAL_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> AsyncIterator[bytes]:
    """Server-Sent Events for one job until it reaches a terminal status.

    `event: progress` carries the job resource whenever its counters change (and once at
    the start), `event: status` the job resource whenever its status changes; the stream
    ends after the terminal status event. `event: deleted` ends it if the job is deleted.
    A comment line every `heartbeat_s` keeps proxies from closing an idle stream.
    """
    loop = asyncio.get_running_loop()
    # subscribe before the first read, so a change between the two is not missed
    with hub.watch(job_id) as wake:
        job = await _read(db, tenant, job_id)
        if job is None:
            yield b'event: deleted\ndata: {"id": "' + str(job_id).encode() + b'"}\n\n'
            return
        yield _sse("progress", job)
        if job.status in TERMINAL_JOB_STATUSES:
            yield _sse("status", job)
            return
        last_sent = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):  # the timeout is the polling fallback
                await asyncio.wait_for(wake.wait(), timeout=poll_s)
            wake.clear()
            if await is_disconnected():
                return
            try:
                current = await _read(db, tenant, job_id)
            except _DB_ERRORS as error:
                if not is_unavailable(error):
                    raise
                # an outage: keep the stream open (heartbeats) and read again next tick
                logger.warning("job stream %s: database unavailable (%s)", job_id, error)
                current = job
            if current is None:
                yield b'event: deleted\ndata: {"id": "' + str(job_id).encode() + b'"}\n\n'
                return
            if current.status != job.status:
                job = current
                yield _sse("status", job)
                last_sent = loop.time()
                if job.status in TERMINAL_JOB_STATUSES:
                    return
            elif current.progress != job.progress:
                job = current
                yield _sse("progress", job)
                last_sent = loop.time()
            if loop.time() - last_sent >= heartbeat_s:
                yield b": heartbeat\n\n"
                last_sent = loop.time()
