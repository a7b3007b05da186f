"""AsyncJobExecutor: claims tasks from PostgreSQL, runs them, stores results in batches.

Shape of one worker process:

* a claim loop leases due tasks in batches (one SKIP LOCKED statement, app.services.queue)
  whenever there is room, woken by LISTEN/NOTIFY and by a polling fallback;
* every claimed task runs as its own asyncio task under a global concurrency bound and a
  per-host gate (concurrency per host, delay between starts, Retry-After);
* outcomes go to a writer that stores them in batches (group commit), fenced by the lease,
  so a worker that lost its lease stores nothing and no result is stored twice;
* the claim loop and the writer each keep one pooled connection for their hot statements
  and send them straight to the asyncpg driver (HeldConnection): no pool checkout and
  pre-ping per batch, no SQLAlchemy statement overhead, one BEGIN/statement/COMMIT;
* a heartbeat renews this worker's leases and its `workers` row, requeues tasks held by
  dead workers, and notices drain requests; cancelled jobs abort their in-flight fetches;
* stop() drains: no new claims, in-flight work gets a grace period, unfinished leases go
  back to the queue, the worker row is marked stopped;
* periodic work beside the queue, each in a loop of its own and safe with any number of
  workers (SKIP LOCKED claims through the database): webhook deliveries from the outbox
  (woken by job status NOTIFYs), schedule ticks, and the retention purge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app import __version__
from app.config import Settings
from app.database.connection import ConnectionManager, DatabaseUnavailable
from app.database.listener import PgListener
from app.database.models import JobStatus
from app.logging import log_context
from app.scraper.ssrf import SSRFGuard
from app.services import queue, retention, schedules, webhooks
from app.services.admin import NOTIFY_WORKERS
from app.services.queue import ClaimedTask, Outcome
from app.services.state import NOTIFY_JOBS
from app.utils.handlers import (
    JobContext,
    PageHandler,
    ScrapeHandler,
    TaskHandler,
    crash_outcome,
    exhausted,
    load_job_context,
)

logger = logging.getLogger(__name__)

STORED_LINKS_PER_JOB = 50_000

# Errors that mean "the database is briefly unreachable": the loops back off and go on.
# (The asyncpg ones come from the hot statements sent straight to the driver.)
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    DatabaseUnavailable,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    sa_exc.DBAPIError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def is_retryable_db_error(error: BaseException) -> bool:
    if isinstance(error, asyncpg.PostgresError):
        # deadlock / serialization failure, connection exception (08), server shutting
        # down or restarting (57P): retry; anything else is a bug or bad data
        sqlstate = str(getattr(error, "sqlstate", "") or "")
        return sqlstate in {"40P01", "40001"} or sqlstate.startswith(("08", "57P"))
    if isinstance(error, asyncpg.InterfaceError):
        return True  # the driver connection is closed or was lost
    if isinstance(error, sa_exc.DBAPIError):
        code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
        # deadlock / serialization failure: retry the batch; connection problems: back off
        if code in {"40P01", "40001"}:
            return True
        return bool(
            error.connection_invalidated
            or isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
            or isinstance(error.orig, OSError | TimeoutError)
            or "connection" in str(error.orig).lower()
        )
    return isinstance(error, TRANSIENT_DB_ERRORS)


# after a claim cut short by host room, the next claim waits for this many freed slots
CLAIM_AFTER_FREED = 4
# An empty claim may only mean that other workers' claims held the hosts with work (their
# rows are locked for the length of a claim, and skipped): a worker whose claims came back
# empty tries again after 50, 100, 200 and 400 ms before it waits the poll interval
# (NOTIFY wakes it sooner), so a second worker on a busy one-host crawl is not left idle
# for whole poll intervals.
EMPTY_CLAIM_RETRY_S = 0.05
EMPTY_CLAIM_RETRIES = 4
# Outcomes waiting for the writer, in chunks (claim_batch x 5 outcomes): at this many the
# claim loop waits for the writer to catch up.
MAX_UNSTORED_CHUNKS = 2


class HeldConnection:
    """One pooled connection kept by an executor loop for its hot statements.

    Checked out once (the pool's pre-ping runs then, not per batch) and switched to
    AUTOCOMMIT, so SQLAlchemy never sends a BEGIN of its own. Each unit of work is one
    transaction opened on the asyncpg driver connection underneath: the fast statements
    go to the driver, and SQLAlchemy statements on `conn` (job transitions, such as
    finish_if_done) run inside the same transaction. Any error or cancellation inside a
    unit discards the connection (invalidated: the server rolls back whatever was open),
    and the next unit checks out a fresh one. Outside a unit the connection is idle, so
    the pool stays consistent whatever the loop is doing.
    """

    def __init__(self, db: ConnectionManager) -> None:
        self.db = db
        self._conn: AsyncConnection | None = None
        self._driver: Any = None

    async def _acquire(self) -> tuple[AsyncConnection, Any]:
        if self._conn is None or self._driver is None or self._driver.is_closed():
            await self.release()
            conn = await self.db.engine.connect()
            try:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                raw = await conn.get_raw_connection()
            except BaseException:
                await conn.close()
                raise
            self._conn, self._driver = conn, raw.driver_connection
        return self._conn, self._driver

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        conn, driver = await self._acquire()
        try:
            xact = driver.transaction()
            await xact.start()
            yield conn, driver
            if conn.in_transaction():
                # SQLAlchemy's autobegun transaction: a no-op under AUTOCOMMIT
                await conn.commit()
            await xact.commit()
        except BaseException:
            # no ROLLBACK round trip (it could hang on a dead server): the connection is
            # dropped, and the server rolls back what was open
            await self.release(discard=True)
            raise

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        """One statement that is its own transaction (no BEGIN/COMMIT round trips)."""
        conn, driver = await self._acquire()
        try:
            yield conn, driver
        except BaseException:
            await self.release(discard=True)
            raise

    async def release(self, *, discard: bool = False) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is None:
            return
        try:
            if discard:
                await conn.invalidate()
            await conn.close()
        except Exception as error:
            # it was being thrown away anyway; the pool replaces it
            logger.debug("closing a held connection failed: %s", error)


@dataclass
class ExecutorStats:
    claimed: int = 0
    claim_batches: int = 0
    completed: int = 0
    flushes: int = 0
    retried: int = 0
    failed: int = 0
    cancelled_inflight: int = 0
    recovered: int = 0
    db_errors: int = 0
    webhook_attempts: int = 0
    schedule_ticks: int = 0
    purged_jobs: int = 0


@dataclass
class HostGate:
    """Politeness for one host inside this process: concurrency, spacing, Retry-After.

    Also the executor's global concurrency bound (a gate without spacing). try_acquire()
    is the no-await fast path taken by almost every task; acquire() waits in FIFO order.
    """

    limit: int
    delay_s: float = 0.0
    in_flight: int = 0
    next_start: float = 0.0
    blocked_until: float = 0.0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def try_acquire(self) -> bool:
        """Take a slot now if the gate is open and nobody is queued before us."""
        if self.in_flight >= self.limit or self.waiters:
            return False
        if self.delay_s or self.blocked_until:
            now = asyncio.get_running_loop().time()
            if now < self.next_start or now < self.blocked_until:
                return False
            self.next_start = now + self.delay_s
        self.in_flight += 1
        return True

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wait_for = max(self.next_start, self.blocked_until) - now
            if self.in_flight < self.limit and wait_for <= 0:
                self.in_flight += 1
                self.next_start = now + self.delay_s
                return
            if self.in_flight >= self.limit:
                fut: asyncio.Future[None] = loop.create_future()
                self.waiters.append(fut)
                try:
                    await fut
                except asyncio.CancelledError:
                    if fut.done() and not fut.cancelled():
                        self._wake_next()  # we were woken, then cancelled: pass it on
                    else:
                        with contextlib.suppress(ValueError):
                            self.waiters.remove(fut)
                    raise
            else:
                await asyncio.sleep(wait_for)

    def release(self) -> None:
        self.in_flight -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def back_off(self, seconds: float) -> None:
        until = asyncio.get_running_loop().time() + seconds
        self.blocked_until = max(self.blocked_until, until)


class AsyncJobExecutor:
    def __init__(
        self,
        db: ConnectionManager,
        settings: Settings,
        *,
        handler: TaskHandler | None = None,
        concurrency: int | None = None,
        listen: bool = True,
        name: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.worker_id = uuid.uuid4()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.concurrency = concurrency or settings.worker_concurrency
        self.batch = settings.claim_batch
        self._chunk = self.batch * 5  # most outcomes stored by one statement
        self.handler: TaskHandler = handler or PageHandler(settings, db)
        if isinstance(self.handler, ScrapeHandler):
            self.handler.on_fetched = self._on_fetched
        # tasks still running whose requests to their host are over (parsing, extracting)
        self._fetch_over: set[int] = set()
        self.stats = ExecutorStats()
        self._listener = (
            PgListener(
                db.url, enabled=listen and not settings.pgbouncer, application_name="trawler-worker"
            )
            if listen
            else None
        )
        self._claim_conn = HeldConnection(db)
        self._writer_conn = HeldConnection(db)
        # the global concurrency bound: a gate without spacing
        self._slots = HostGate(limit=self.concurrency)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._claiming_stopped = asyncio.Event()
        self._idle = asyncio.Event()
        self._outcomes: list[Outcome] = []
        self._outcome_ready = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._by_job: dict[uuid.UUID, set[int]] = defaultdict(set)
        self._unflushed: set[int] = set()
        self._fetching: set[int] = set()  # in-flight tasks past their slot and host gate
        # per crawl job: canonical links whose enqueue this worker committed (bounded)
        self._links_stored: dict[uuid.UUID, set[str]] = {}
        self._contexts: OrderedDict[uuid.UUID, JobContext] = OrderedDict()
        self._running_jobs: set[uuid.UUID] = set()
        self._gates: dict[str, HostGate] = {}
        self._host_cursor = ""  # round robin over hosts: the next claim starts after it
        self._loops: list[asyncio.Task[None]] = []
        self._draining = False
        self._more_work = True
        self._room_bound = False
        self._last_claim_full = False
        self._empty_claims = 0  # empty claims in a row (see EMPTY_CLAIM_RETRIES)
        self._freed = 0  # host slots freed since the last claim (see _freed_slot)
        # jobs (among those this worker runs) whose webhook wants job.page events
        self._page_hook_jobs: set[uuid.UUID] = set()
        self._webhook_wake = asyncio.Event()
        self._guard = SSRFGuard(
            allow_private=settings.allow_private_networks, allow_cidrs=settings.allowed_cidrs
        )
        self._started = False
        self.crashed: BaseException | None = None
        self.finished_jobs: asyncio.Queue[uuid.UUID] = asyncio.Queue()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._register()
        if self._listener is not None:
            self._listener.subscribe(queue.NOTIFY_TASKS, self._on_tasks_notification)
            self._listener.subscribe(NOTIFY_JOBS, self._on_job_notification)
            self._listener.subscribe(webhooks.NOTIFY_WEBHOOKS, self._on_webhook_notification)
            self._listener.subscribe(NOTIFY_WORKERS, self._on_worker_notification)
            self._listener.start()
        loop = asyncio.get_running_loop()
        # every loop (and every task it starts) logs with this worker's id
        with log_context(worker_id=self.worker_id):
            self._start_loops(loop)
        for task in self._loops:
            task.add_done_callback(self._loop_done)
        self._wake.set()
        logger.info(
            "worker %s started (%s, concurrency %d)", self.worker_id, self.name, self.concurrency
        )

    def _start_loops(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loops = [
            loop.create_task(self._claim_loop(), name="executor-claim"),
            loop.create_task(self._writer_loop(), name="executor-writer"),
            loop.create_task(self._heartbeat_loop(), name="executor-heartbeat"),
            loop.create_task(self._cancel_watch_loop(), name="executor-cancel-watch"),
            loop.create_task(self._webhook_loop(), name="executor-webhooks"),
            loop.create_task(self._schedule_loop(), name="executor-schedules"),
            loop.create_task(self._retention_loop(), name="executor-retention"),
        ]

    def _on_worker_notification(self, _channel: str, payload: str) -> None:
        """An admin asked this worker to drain: stop claiming now, not at the next beat."""
        if payload == str(self.worker_id) and not self._draining:
            logger.info("drain requested: finishing in-flight work, then exiting")
            self._draining = True
            self._wake.set()

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # a loop died of a bug: stop the whole worker rather than idle while registered
            self.crashed = error
            logger.critical(
                "executor loop %s crashed; stopping worker", task.get_name(), exc_info=error
            )
            self.request_stop()

    def _on_tasks_notification(self, _channel: str, _payload: str) -> None:
        self._more_work = True
        self._wake.set()

    def request_stop(self) -> None:
        """Stop claiming now; stop() finishes the drain."""
        self._stopping.set()
        self._wake.set()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: finish in-flight work within the grace period, return the rest."""
        if not self._started:
            return
        grace = self.settings.shutdown_grace if grace is None else grace
        self.request_stop()
        claim_loop = self._loops[0] if self._loops else None
        if claim_loop is not None:
            await asyncio.gather(claim_loop, return_exceptions=True)
        # tasks leased but not started (waiting for a slot or their host): cancelled now,
        # their leases go back below; only fetches already under way get the grace period
        unstarted = [t for i, t in self._inflight.items() if i not in self._fetching]
        for task in unstarted:
            task.cancel()
        if unstarted:
            await asyncio.gather(*unstarted, return_exceptions=True)
        pending = list(self._inflight.values())
        if pending:
            _done, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
                logger.warning("%d tasks unfinished after %.1fs grace", len(still), grace)
        # the writer flushes what finished, then everything else still leased goes back
        self._outcome_ready.set()
        for task in self._loops[1:]:
            task.cancel()
        await asyncio.gather(*self._loops[1:], return_exceptions=True)
        await self._flush_all(final=True)
        await self._writer_conn.release()
        try:
            async with self.db.connect() as conn:
                released = await queue.release(conn, self.worker_id)
                await conn.execute(
                    text(
                        "UPDATE workers SET state = 'stopped', in_flight = 0, "
                        "heartbeat_at = now() WHERE id = :id"
                    ),
                    {"id": self.worker_id},
                )
            if released:
                logger.info("returned %d unfinished leases to the queue", released)
        except TRANSIENT_DB_ERRORS as error:
            # their leases expire and another worker recovers them
            logger.warning("could not return leases on shutdown: %s", error)
        if self._listener is not None:
            await self._listener.stop()
        await self.handler.close()
        self._started = False
        logger.info("worker %s stopped", self.worker_id)

    async def run_forever(self) -> None:
        """Run until request_stop() (SIGTERM handler) or a drain request, then stop()."""
        await self.start()
        await self._stopping.wait()
        await self.stop()

    # ------------------------------------------------------------------ registration

    async def _register(self) -> None:
        async with self.db.connect() as conn:
            await conn.execute(
                text(
                    "INSERT INTO workers (id, hostname, pid, concurrency, version) "
                    "VALUES (:id, :host, :pid, :c, :v)"
                ),
                {
                    "id": self.worker_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "c": self.concurrency,
                    "v": __version__,
                },
            )

    # ------------------------------------------------------------------ claiming

    @property
    def outstanding(self) -> int:
        return len(self._inflight)

    @property
    def unstored(self) -> int:
        """Outcomes of finished tasks that the writer has not stored yet."""
        return len(self._outcomes)

    def _held(self) -> list[int]:
        """Tasks whose lease this worker holds: running, or done and not yet stored."""
        return list(self._inflight.keys() | self._unflushed)

    def _fetched(self) -> list[int]:
        """Leased tasks whose fetch is over: parsing, or waiting for their outcome to be
        stored. The claim does not count them against their host's concurrency."""
        inflight, over = self._inflight, self._fetch_over
        return [t for t in self._unflushed if t not in inflight or t in over]

    def _on_fetched(self, task_id: int) -> None:
        self._fetch_over.add(task_id)
        self._freed_slot()

    def _freed_slot(self) -> None:
        """A task stopped occupying its host: after a claim cut short by host room, claim
        again once a few slots are free (one claim per slot would keep PostgreSQL busy
        with claims; the writer's flushes wake the claim loop too)."""
        if self._room_bound:
            self._freed += 1
            if self._freed >= CLAIM_AFTER_FREED:
                self._wake.set()

    async def _claim_loop(self) -> None:
        try:
            await self._claim_until_stopped()
        finally:
            await self._claim_conn.release()

    async def _claim_until_stopped(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            if self._draining:
                # drain: claim nothing more, exit once in-flight work is stored
                if not self.outstanding and not self._outcomes:
                    self.request_stop()
                    break
                await self._wait_wake(0.2)
                continue
            # refill only when a batch' worth of room is free, so claims stay batched; up
            # to `concurrency` tasks may wait locally (per-host gates) beyond those running
            room = 2 * self.concurrency - self.outstanding
            if self.outstanding and room < min(self.batch, self.concurrency):
                await self._wait_wake(self.settings.poll_interval)
                continue
            if self.unstored >= MAX_UNSTORED_CHUNKS * self._chunk:
                # finished tasks whose outcomes wait for the writer keep their leases: when
                # it falls behind (a slow database), lease nothing more until it catches up
                # (each flush wakes this loop), or the worker would lease the whole queue
                await self._wait_wake(self.settings.poll_interval)
                continue
            asked = min(room, self.batch)
            self._freed = 0
            try:
                # the claim is one statement (see queue.claim): no transaction around it
                async with self._claim_conn.autocommit() as (conn, driver):
                    claimed = await queue.claim(
                        conn,
                        self.worker_id,
                        asked,
                        self.settings.lease_seconds,
                        driver=driver,
                        cursor=self._host_cursor,
                        # marking fetched tasks (an UPDATE of their rows) frees host
                        # room early; after a full claim no host's room held it back
                        done=() if self._last_claim_full else self._fetched(),
                        live_s=3 * self.settings.heartbeat_seconds,
                    )
                tasks = claimed.tasks
                job_ids = {t.job_id for t in tasks}
                new_jobs = job_ids - self._running_jobs
                if new_jobs:
                    # a crash before this leaves the job queued until its tasks' leases
                    # expire and another claim marks it running
                    async with self._claim_conn.transaction() as (conn, _driver):
                        await queue.mark_jobs_running(conn, list(new_jobs))
                if tasks:
                    await self._ensure_contexts(job_ids)
                    self._running_jobs |= job_ids
            except TRANSIENT_DB_ERRORS as error:
                if not is_retryable_db_error(error):
                    logger.exception("claim failed")
                    raise
                self.stats.db_errors += 1
                logger.warning("claim failed (%s); retrying in %.1fs", _short(error), backoff)
                await self._wait_wake(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self.stats.claim_batches += 1
            self.stats.claimed += len(tasks)
            self._host_cursor = claimed.cursor
            spacing = min((t.delay_ms for t in tasks if t.delay_ms), default=0)
            if spacing:
                # a host with a delay gets its next task one delay from now: claim again then
                asyncio.get_running_loop().call_later(spacing / 1000.0, self._wake.set)
            for task in tasks:
                self._spawn(task)
            # a short claim means the queue is drained for now: sleep until NOTIFY (new
            # work) or the poll interval (retries coming due); a full one means claim again
            # as soon as there is room
            self._more_work = self._last_claim_full = len(tasks) >= asked
            # a short claim that still found work was cut by host room: a fetch that ends
            # frees room (see queue.claim's `done`), so claim again then
            self._room_bound = bool(tasks)
            self._empty_claims = 0 if tasks else self._empty_claims + 1
            if not self._more_work:
                await self._wait_wake(self._idle_wait())

    def _idle_wait(self) -> float:
        """How long to wait for a wake-up after a short claim before claiming again."""
        n = self._empty_claims
        if 0 < n <= EMPTY_CLAIM_RETRIES:
            return min(self.settings.poll_interval, EMPTY_CLAIM_RETRY_S * (1 << (n - 1)))
        return self.settings.poll_interval

    async def _wait_wake(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _ensure_contexts(self, job_ids: set[uuid.UUID]) -> None:
        missing = [j for j in job_ids if j not in self._contexts]
        if missing:
            async with self.db.connect() as conn:
                contexts = await load_job_context(conn, missing, self.settings)
                self._page_hook_jobs |= await webhooks.jobs_with_page_events(conn, missing)
            for ctx in contexts:
                self._contexts[ctx.job_id] = ctx
        for job_id in job_ids:
            if job_id in self._contexts:
                self._contexts.move_to_end(job_id)
        while len(self._contexts) > 1000:
            evicted, _ = self._contexts.popitem(last=False)
            self._page_hook_jobs.discard(evicted)
            self._links_stored.pop(evicted, None)

    def _spawn(self, task: ClaimedTask) -> None:
        with log_context(job_id=task.job_id):
            runner = asyncio.get_running_loop().create_task(self._run_task(task))
        self._inflight[task.id] = runner
        self._by_job[task.job_id].add(task.id)
        self._unflushed.add(task.id)

    def _gate(self, host: str, ctx: JobContext) -> HostGate:
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = HostGate(limit=ctx.per_host_concurrency, delay_s=ctx.delay_s)
        else:
            # the strictest politeness of the jobs using the host wins
            gate.limit = (
                min(gate.limit, ctx.per_host_concurrency)
                if gate.in_flight
                else (ctx.per_host_concurrency)
            )
            gate.delay_s = max(gate.delay_s, ctx.delay_s)
        return gate

    async def _run_task(self, task: ClaimedTask) -> None:
        ctx = self._contexts.get(task.job_id)
        try:
            if ctx is None:
                outcome = Outcome(task.id, task.job_id, "failed", error="job vanished", page=None)
            else:
                outcome = await self._execute(task, ctx)
            self._record(outcome)
        except asyncio.CancelledError:
            # cancelled job or shutdown: no outcome; the row is cancelled or gets released
            self.stats.cancelled_inflight += 1
            raise
        finally:
            self._inflight.pop(task.id, None)
            self._fetching.discard(task.id)
            ids = self._by_job.get(task.job_id)
            if ids is not None:
                ids.discard(task.id)
                if not ids:
                    del self._by_job[task.job_id]
            if task.id not in self._fetch_over:
                self._freed_slot()  # (a task that reported its fetch over counted then)
            self._fetch_over.discard(task.id)
            if self._more_work or self._draining:
                self._wake.set()

    async def _execute(self, task: ClaimedTask, ctx: JobContext) -> Outcome:
        gate = self._gate(task.host, ctx)
        if not gate.try_acquire():
            await gate.acquire()
        try:
            slots = self._slots
            if not slots.try_acquire():
                await slots.acquire()
            try:
                self._fetching.add(task.id)
                outcome = await self.handler(task, ctx)
            finally:
                slots.release()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if is_retryable_db_error(error):
                # the database blinked during the task (robots cache): try the URL again
                logger.warning("task %s: database unavailable (%s); retrying", task.id, error)
                outcome = Outcome(
                    task.id, task.job_id, "retry", error=f"database unavailable: {_short(error)}"
                )
            else:
                # a bug in extraction must not kill the worker: record it on the page
                logger.exception("task %s (%s) crashed", task.id, task.url)
                outcome = crash_outcome(task, error)
        finally:
            gate.release()
        if outcome.state == "retry":
            if task.attempts >= task.max_attempts:
                outcome = exhausted(task, outcome)
            else:
                if outcome.retry_in_s <= 0:
                    outcome.retry_in_s = self._backoff(task.attempts)
                if outcome.retry_after_host:
                    gate.back_off(outcome.retry_in_s)
                    await self._block_host(task.host, outcome.retry_in_s)
        return outcome

    async def _block_host(self, host: str, seconds: float) -> None:
        """Retry-After holds for every worker: no claim grants this host before then."""
        try:
            async with self.db.connect() as conn:
                await queue.block_host(conn, host, seconds)
        except TRANSIENT_DB_ERRORS as error:
            if not is_retryable_db_error(error):
                logger.exception("blocking host %s failed", host)
                raise
            # this process still holds back (its gate); other workers may try once more
            self.stats.db_errors += 1
            logger.warning("could not record Retry-After for %s: %s", host, _short(error))

    def _backoff(self, attempt: int) -> float:
        base: float = self.settings.retry_base_s * float(2 ** max(0, attempt - 1))
        capped = min(self.settings.retry_max_s, base)
        return capped * random.uniform(0.5, 1.0)

    # ------------------------------------------------------------------ writing

    def _record(self, outcome: Outcome) -> None:
        if outcome.links:
            # links this worker already stored for the job need not go to the database
            # again (its unique index stays the authority for everyone else's)
            stored = self._links_stored.get(outcome.job_id)
            if stored:
                outcome.links = [link for link in outcome.links if link[0] not in stored]
        if outcome.state == "retry":
            self.stats.retried += 1
        elif outcome.state == "failed":
            self.stats.failed += 1
        self._outcomes.append(outcome)
        self._outcome_ready.set()

    async def _writer_loop(self) -> None:
        try:
            while True:
                await self._outcome_ready.wait()
                self._outcome_ready.clear()
                # group commit: while more outcomes are on their way (tasks in flight, or
                # the last claim came back full), let them gather for one flush interval,
                # unless a whole chunk is already waiting. Short tasks then cost one
                # complete statement per several claims, not one per claim.
                if len(self._outcomes) < self._chunk and (self._inflight or self._more_work):
                    await asyncio.sleep(self.settings.flush_interval)
                await self._flush_all(final=False)
        finally:
            await self._writer_conn.release()

    async def _flush_all(self, *, final: bool) -> None:
        backoff = 0.2
        while self._outcomes:
            chunk = self._outcomes[: self._chunk]
            try:
                page_events = 0
                async with self._writer_conn.transaction() as (conn, driver):

                    async def record_page_events(chunk: list[Outcome] = chunk) -> None:
                        # job.page outbox rows, in the transaction that stores the pages
                        nonlocal page_events
                        page_events = await self._record_page_events(conn, chunk)

                    finished = await queue.complete(
                        conn,
                        self.worker_id,
                        chunk,
                        driver=driver,
                        before_settle=record_page_events,
                    )
            except TRANSIENT_DB_ERRORS as error:
                if not is_retryable_db_error(error):
                    logger.exception("storing %d outcomes failed", len(chunk))
                    raise
                self.stats.db_errors += 1
                if final and backoff > 5:
                    logger.error("giving up on %d outcomes at shutdown: %s", len(chunk), error)
                    return
                logger.warning("storing results failed (%s); retrying", _short(error))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            del self._outcomes[: len(chunk)]
            if page_events or finished:
                self._webhook_wake.set()
            self.stats.flushes += 1
            self.stats.completed += sum(1 for o in chunk if o.state != "retry")
            for outcome in chunk:
                self._unflushed.discard(outcome.task_id)
                if outcome.links:
                    stored = self._links_stored.setdefault(outcome.job_id, set())
                    if len(stored) >= STORED_LINKS_PER_JOB:
                        stored.clear()
                    stored.update(url for url, _ in outcome.links)
            for job_id in finished:
                self._running_jobs.discard(job_id)
                self._links_stored.pop(job_id, None)
                self.finished_jobs.put_nowait(job_id)
            if any(o.state == "retry" for o in chunk):
                self._more_work = True
            # the stored outcomes ended their leases, which frees room on their hosts (the
            # per-host bound counts leases cluster-wide): a claim cut short by it can go on
            self._wake.set()

    async def _record_page_events(self, conn: AsyncConnection, chunk: list[Outcome]) -> int:
        if not self._page_hook_jobs:
            return 0
        task_ids = [
            o.task_id for o in chunk if o.page is not None and o.job_id in self._page_hook_jobs
        ]
        return await webhooks.record_page_events(conn, task_ids) if task_ids else 0

    # ------------------------------------------------------------------ periodic work

    async def _periodic(
        self,
        what: str,
        interval: float,
        work: Callable[[], Awaitable[bool]],
        wake: asyncio.Event | None = None,
    ) -> None:
        """Run `work` every `interval` (sooner when `wake` is set, again at once when it
        returns True: a full batch). Outages back off; a bug stops the worker."""
        while True:
            try:
                again = await work()
            except TRANSIENT_DB_ERRORS as error:
                if not is_retryable_db_error(error):
                    logger.exception("%s failed", what)
                    raise
                self.stats.db_errors += 1
                logger.warning("%s failed: %s", what, _short(error))
                again = False
            if again:
                await asyncio.sleep(0)
                continue
            if wake is None:
                await asyncio.sleep(interval)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), interval)
                wake.clear()

    async def _webhook_loop(self) -> None:
        """Deliver due webhook events from the outbox (any worker; SKIP LOCKED)."""
        sender = webhooks.WebhookSender(self.settings)

        async def work() -> bool:
            claimed = await webhooks.deliver_due(self.db, sender, self.settings)
            self.stats.webhook_attempts += claimed
            return claimed >= self.settings.webhook_batch

        try:
            await self._periodic(
                "webhook delivery", self.settings.webhook_poll_interval, work, self._webhook_wake
            )
        finally:
            await sender.close()

    async def _schedule_loop(self) -> None:
        """Submit the jobs of due schedule ticks (exactly one run per tick, any workers)."""
        limit = 20

        async def work() -> bool:
            if self._stopping.is_set() or self._draining:
                return False
            handled = await schedules.run_due(self.db, self.settings, self._guard, limit=limit)
            self.stats.schedule_ticks += handled
            return handled >= limit

        await self._periodic("schedule ticks", self.settings.schedule_poll_interval, work)

    async def _retention_loop(self) -> None:
        """Delete expired jobs (retain_days) and old schedule run history, in batches."""
        batch = self.settings.purge_batch_size

        async def work() -> bool:
            result = await retention.purge_expired(self.db, batch=batch, max_batches=100)
            self.stats.purged_jobs += result.jobs
            await schedules.prune_runs(self.db, self.settings.schedule_runs_retain_days, batch)
            return False

        await self._periodic("retention purge", self.settings.retention_interval_s, work)

    # ------------------------------------------------------------------ heartbeat

    async def _heartbeat_loop(self) -> None:
        beat = 0
        interval = self.settings.heartbeat_seconds
        while True:
            await asyncio.sleep(interval)
            beat += 1
            try:
                async with self.db.connect() as conn:
                    state = (
                        await conn.execute(
                            text(
                                "UPDATE workers SET heartbeat_at = now(), in_flight = :n "
                                "WHERE id = :id RETURNING state"
                            ),
                            {"id": self.worker_id, "n": self.outstanding},
                        )
                    ).scalar_one_or_none()
                    held = self._held()
                    if held:
                        await queue.renew_leases(
                            conn, self.worker_id, self.settings.lease_seconds, held
                        )
                    # leases this worker owns but does not hold (a claim whose COMMIT
                    # answer was lost): back to the queue, not renewed forever. The age
                    # spares a claim committing right now, whose tasks are not spawned yet.
                    orphans = await queue.release(
                        conn, self.worker_id, keep=held, older_than_s=max(5.0, 2 * interval)
                    )
                if orphans:
                    logger.warning("returned %d leases this worker did not hold", orphans)
                if state is None:
                    # our row was removed (purged as stale): register again
                    await self._register()
                elif state == "draining" and not self._draining:
                    logger.info("drain requested: finishing in-flight work, then exiting")
                    self._draining = True
                    self._wake.set()
                if beat % 3 == 1:
                    async with self.db.connect() as conn:
                        recovered = await queue.recover_lost(
                            conn, stale_s=self.settings.worker_stale_seconds
                        )
                    if recovered:
                        self.stats.recovered += recovered
                        logger.warning("requeued %d tasks held by lost workers", recovered)
            except TRANSIENT_DB_ERRORS as error:
                if not is_retryable_db_error(error):
                    logger.exception("heartbeat failed")
                    raise
                self.stats.db_errors += 1
                logger.warning("heartbeat failed: %s", _short(error))

    # ------------------------------------------------------------------ cancellation

    def _on_webhook_notification(self, _channel: str, _payload: str) -> None:
        self._webhook_wake.set()

    def _on_job_notification(self, _channel: str, payload: str) -> None:
        job_text, _, status = payload.partition(":")
        if status != JobStatus.queued.value:
            # a status with a webhook event: its outbox row may be waiting
            self._webhook_wake.set()
        else:
            # reopened (retry, resume): its next claimed task marks it running again
            with contextlib.suppress(ValueError):
                self._running_jobs.discard(uuid.UUID(job_text))
        if status != JobStatus.cancelled.value:
            return
        with contextlib.suppress(ValueError):
            self._cancel_job(uuid.UUID(job_text))

    def _cancel_job(self, job_id: uuid.UUID) -> None:
        for task_id in list(self._by_job.get(job_id, ())):
            runner = self._inflight.get(task_id)
            if runner is not None:
                runner.cancel()
        self._running_jobs.discard(job_id)
        self._contexts.pop(job_id, None)
        self._page_hook_jobs.discard(job_id)
        self._links_stored.pop(job_id, None)

    async def _cancel_watch_loop(self) -> None:
        """Polling fallback for cancellation (NOTIFY may be lost or unavailable).

        It also forgets jobs this worker believes running that no longer are (cancelled,
        then resumed or retried): the next claim of their tasks marks them running again.
        """
        while True:
            await asyncio.sleep(1.0)
            jobs = list(set(self._by_job) | self._running_jobs)
            if not jobs:
                continue
            try:
                async with self.db.connect() as conn:
                    rows = await conn.execute(
                        text(
                            "SELECT id, status FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) "
                            "AND status <> 'running'"
                        ),
                        {"ids": jobs},
                    )
                    for job_id, status in rows:
                        if status == JobStatus.cancelled.value:
                            self._cancel_job(job_id)
                        else:
                            self._running_jobs.discard(job_id)
            except TRANSIENT_DB_ERRORS as error:
                if not is_retryable_db_error(error):
                    logger.exception("cancel watch failed")
                    raise
                self.stats.db_errors += 1

    # ------------------------------------------------------------------ helpers for callers

    async def wait_for_jobs(
        self,
        job_ids: set[uuid.UUID],
        *,
        on_tick: Callable[[], Awaitable[None]] | None = None,
        tick: float = 0.5,
    ) -> None:
        """Return once every job is terminal (checked in the database)."""
        remaining = set(job_ids)
        while remaining:
            with contextlib.suppress(TimeoutError):
                finished = await asyncio.wait_for(self.finished_jobs.get(), timeout=tick)
                remaining.discard(finished)
            if on_tick is not None:
                await on_tick()
            async with self.db.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) "
                        "AND status IN ('completed', 'failed', 'cancelled')"
                    ),
                    {"ids": list(remaining)},
                )
                remaining -= {r[0] for r in rows}


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def executor_stats(executor: AsyncJobExecutor) -> dict[str, Any]:
    return {
        "worker_id": str(executor.worker_id),
        "outstanding": executor.outstanding,
        **executor.stats.__dict__,
        "time": time.time(),
    }
