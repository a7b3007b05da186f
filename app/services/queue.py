"""The task queue in SQL: claim, complete, release and recover leases, in batches.

A task to be done has a row in `task_queue` (migration 0008): its place in the queue and,
once claimed, its lease. The claim, the renewal and the release write only that narrow
row; the end of a task deletes it and writes the outcome into the tasks row in
unindexed columns only, a HOT update (no index entry) whenever the row's page has room.

Lock order everywhere: queue rows (in task id order) first, then their tasks rows, then
job rows in id order. The claim, the completion, cancellation and lease recovery all
follow it, so they cannot deadlock on each other.

`claim` and `complete` run through SQLAlchemy on any AsyncConnection, or, given the
asyncpg `driver` connection underneath it, send the very same SQL text straight to the
driver (positional parameters, asyncpg's prepared-statement cache, no SQLAlchemy
statement and result overhead) inside a transaction the caller opened on the driver.
The executor takes the driver path: its per-batch cost bounds a worker's throughput on
short tasks.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.database.models import JobStatus
from app.database.statements import positional
from app.scraper.urls import url_hash, url_host
from app.services.state import finish_if_done, transition

NOTIFY_TASKS = "trawler_tasks"


@dataclass(slots=True)
class ClaimedTask:
    id: int
    job_id: uuid.UUID
    url: str
    depth: int
    attempts: int
    max_attempts: int
    host: str
    # the host's delay between fetch starts (max of its delay_ms and robots Crawl-delay)
    delay_ms: int = 0


@dataclass(slots=True)
class PageRow:
    url: str
    final_url: str | None
    status_code: int | None
    ok: bool
    depth: int
    content_type: str | None
    elapsed_ms: int | None
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


OutcomeState = Literal["succeeded", "failed", "retry", "skipped"]


@dataclass(slots=True)
class Outcome:
    """What became of one claimed task. `retry` puts it back with a delay, storing nothing."""

    task_id: int
    job_id: uuid.UUID
    state: OutcomeState
    page: PageRow | None = None
    error: str | None = None
    retry_in_s: float = 0.0
    # the delay came from the server (Retry-After): slow the whole host down, not just this URL
    retry_after_host: bool = False
    # crawl: canonical in-scope links found on the page, with their depth
    links: list[tuple[str, int]] = field(default_factory=list)


# THE CLAIM, two statements run by one call of the function trawler_claim() (migrations
# 0006, 0007, 0008; one round trip, so the hosts' row locks last only as long as
# PostgreSQL's own work, not across round trips to a worker whose event loop is busy
# parsing pages), so that per-host politeness holds across every worker process:
#
# 1. the first statement walks the hosts that have queued work (a skip scan over
#    ix_task_queue_claim, which is led by host), starting after the caller's round-robin
#    cursor, keeps those that are due (not blocked by Retry-After, next fetch start
#    reached), not obviously saturated and with a due task, and locks their `hosts` rows
#    FOR UPDATE SKIP LOCKED. A host is thus claimed for by one worker at a time; the
#    others skip it.
# 2. the second then runs with a fresh snapshot, taken after those locks were granted, so
#    it sees every lease committed by the previous holder of each lock. Per host it counts
#    the leased tasks (fetches in flight, cluster-wide; ix_task_queue_leased) and takes at
#    most `max_concurrency - leased` of its best due tasks (priority, due time, FIFO).
#    Leased tasks whose requests are over (parsing, or waiting to be stored) hold no
#    connection to the host and are not counted: the claiming worker names its own in
#    `done`, the function marks them (task_queue.fetched_at, cleared when it is leased)
#    and every worker's claim skips marked tasks from then on. Those the worker's writer
#    is storing at that moment are row-locked by the completion: the mark skips them
#    rather than wait for that transaction (migration 0007). A worker
#    takes at most its share of a host's limit, split evenly among the running workers
#    (heartbeat within `live_s`): otherwise the worker whose fetch ended first claims the
#    freed slot again at once and a second worker on a one-host crawl starves. A
#    host with a delay between fetches (max of delay_ms and robots Crawl-delay) gets one
#    task at a time, and only when none is leased; its next_fetch_at moves one delay on
#    (the worker moves it again when the fetch really starts, see mark_fetch_started).
#    Tasks are leased, job counters move, unless an admin paused the cluster.
#
# Completion never touches `hosts`: a lease that ends frees the host's room by itself, and
# a crashed worker's leases free it when they are recovered. The function's last row
# carries the cursor and the number of hosts locked.
MAX_HOSTS_PER_CLAIM = 32
_CLAIM_SQL = text(
    "SELECT * FROM trawler_claim(:after, :n, :max_hosts, :worker, :lease, "
    "CAST(:done AS bigint[]), :live_s)"
)
_CLAIM_NAMES = ("after", "n", "max_hosts", "worker", "lease", "done", "live_s")
_CLAIM_RAW = (positional(_CLAIM_SQL.text, _CLAIM_NAMES), _CLAIM_NAMES)


@dataclass(slots=True)
class Claim:
    """One claim's tasks, and where the next claim's walk over the hosts starts."""

    tasks: list[ClaimedTask]
    cursor: str
    hosts: int  # hosts locked for this claim


async def _fetch(
    conn: AsyncConnection,
    driver: Any,
    sql: Any,
    raw: tuple[str, Sequence[str]],
    params: dict[str, Any],
) -> list[Any]:
    """Run `sql` through SQLAlchemy, or its positional twin straight on the driver."""
    if driver is not None:
        statement, names = raw
        return list(await driver.fetch(statement, *(params[name] for name in names)))
    return list((await conn.execute(sql, params)).all())


async def claim(
    conn: AsyncConnection,
    worker_id: uuid.UUID,
    limit: int,
    lease_s: float,
    *,
    driver: Any = None,
    cursor: str = "",
    done: Sequence[int] = (),
    live_s: float = 15.0,
) -> Claim:
    """Lease up to `limit` due tasks to this worker, within every host's politeness.

    `cursor` is the last host the previous claim locked: the walk over hosts starts after
    it and wraps around, so every host with work gets its turn. `done`: this worker's
    leased tasks whose requests are over (outcome not stored yet); they free their
    host's room, for every worker, at once instead of at the store. `live_s`: workers
    whose heartbeat is older are not counted among those sharing a host's room. With
    `driver` (the asyncpg connection under `conn`, inside a transaction the caller opened
    on it) the statements go straight to the driver: the executor's fast path.
    """
    # a claim serves at most MAX_HOSTS_PER_CLAIM hosts; the cursor brings the others' turn
    params = {
        "after": cursor,
        "n": limit,
        "max_hosts": MAX_HOSTS_PER_CLAIM,
        "worker": worker_id,
        "lease": float(lease_s),
        "done": list(done),
        "live_s": float(live_s),
    }
    rows = await _fetch(conn, driver, _CLAIM_SQL, _CLAIM_RAW, params)
    meta = rows[-1]  # (no task) ... cursor, hosts locked
    tasks = [ClaimedTask(*row[:8]) for row in rows[:-1]]
    return Claim(tasks, meta[8], meta[9])


# A fetch from a host with a delay between fetches is starting now: its next start may come
# one delay from now at the earliest, whenever the claim granted this one.
_FETCH_STARTED_SQL = text(
    "UPDATE hosts SET next_fetch_at = greatest(next_fetch_at, "
    "now() + make_interval(secs => :delay_s)) WHERE host = :host"
)


async def mark_fetch_started(conn: AsyncConnection, host: str, delay_s: float) -> None:
    await conn.execute(_FETCH_STARTED_SQL, {"host": host, "delay_s": delay_s})


# Retry-After from a host (429/503): no worker fetches from it again before then.
_BLOCK_HOST_SQL = text(
    "UPDATE hosts SET blocked_until = greatest(blocked_until, "
    "now() + make_interval(secs => :secs)), updated_at = now() WHERE host = :host"
)


async def block_host(conn: AsyncConnection, host: str, seconds: float) -> None:
    await conn.execute(_BLOCK_HOST_SQL, {"host": host, "secs": seconds})


async def mark_jobs_running(conn: AsyncConnection, job_ids: Sequence[uuid.UUID]) -> None:
    await transition(conn, job_ids, JobStatus.running)


# Group commit of many outcomes, in two statements of one transaction:
#
# 1. _COMPLETE_SQL ends the leases and stores the pages, without touching `jobs`: only the
#    current lease owner may complete a task (its queue row's lease_owner = me), so a
#    worker whose lease expired and was taken over stores nothing and each task's page is
#    stored exactly once (also backed by the unique index on pages.task_id). It returns
#    what changed per job.
# 2. _SETTLE_SQL then locks the jobs rows (in id order), applies those counts, and adds the
#    crawl links found as new tasks, deduplicated against the job's tasks by the unique URL
#    hash and never more than follow.max_pages tasks in total: under the lock, concurrent
#    completions of one job settle one after another, each seeing the links the previous
#    one added (the function trawler_settle(), migration 0007: the lock and the settling
#    are two statements, so the second's snapshot is newer than the lock), and the cap is
#    exact and reached whenever enough links were found.
#
# The queue rows are locked first, in id order (`mine`): the queue's lock order, which the
# cancellation of a job (jobs._CANCEL_TASKS_SQL) and the release of leases follow too, so
# two of them locking overlapping tasks wait for each other instead of deadlocking (an
# UPDATE ... FROM locks rows in whatever order its plan joins them). The jobs rows are
# locked by the last statement before COMMIT, not the first: claims (which move the same
# counters) wait for that lock, so it is held as briefly as possible.
_COMPLETE_SQL = text(
    """
WITH v AS (
    SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:states AS text[]),
                         CAST(:delays AS float8[]), CAST(:errors AS text[]))
        AS v(id, state, delay, error)
), mine AS MATERIALIZED (
    -- each queue row found by primary key from its outcome, locked in id order; the lease
    -- is checked on the rows as locked. (With the lease condition on the table it reads,
    -- the planner, expecting few leased tasks, reads every leased task through the partial
    -- index, per batch or even per outcome: slow once a worker holds thousands of leases.)
    SELECT q.task_id AS id, q.lease_owner, q.attempts, v.state, v.delay, v.error
    FROM v JOIN task_queue q ON q.task_id = v.id
    ORDER BY q.task_id
    FOR UPDATE OF q
), ended AS (
    DELETE FROM task_queue q USING mine m
    WHERE q.task_id = m.id AND m.lease_owner = :worker AND m.state <> 'retry'
), retried AS (
    UPDATE task_queue q SET
        lease_owner = NULL, lease_expires_at = NULL, leased_at = NULL, fetched_at = NULL,
        next_attempt_at = now() + make_interval(secs => m.delay)
    FROM mine m
    WHERE q.task_id = m.id AND m.lease_owner = :worker AND m.state = 'retry'
), upd AS (
    -- unindexed columns only: a HOT update
    UPDATE tasks t SET
        status = CASE m.state WHEN 'retry' THEN 'queued' ELSE m.state END,
        next_attempt_at = CASE m.state WHEN 'retry'
                               THEN now() + make_interval(secs => m.delay)
                               ELSE t.next_attempt_at END,
        attempts = m.attempts, last_error = m.error, updated_at = now()
    FROM mine m
    WHERE t.id = m.id AND m.lease_owner = :worker
    RETURNING t.id, t.job_id, m.state
), stored AS (
    INSERT INTO pages (job_id, task_id, url, final_url, status_code, ok, depth,
                       content_type, elapsed_ms, data, error)
    SELECT upd.job_id, p.task_id, p.url, p.final_url, p.status_code, p.ok, p.depth,
           p.content_type, p.elapsed_ms, CAST(p.data AS jsonb), p.error
    FROM unnest(CAST(:p_task AS bigint[]), CAST(:p_url AS text[]),
                CAST(:p_final AS text[]), CAST(:p_code AS int[]), CAST(:p_ok AS bool[]),
                CAST(:p_depth AS int[]), CAST(:p_ctype AS text[]), CAST(:p_ms AS int[]),
                CAST(:p_data AS text[]), CAST(:p_error AS text[]))
        AS p(task_id, url, final_url, status_code, ok, depth, content_type, elapsed_ms,
             data, error)
    JOIN upd ON upd.id = p.task_id AND upd.state IN ('succeeded', 'failed')
    ON CONFLICT (task_id) DO NOTHING
)
SELECT job_id, count(*) AS n,
       count(*) FILTER (WHERE state = 'retry') AS r,
       count(*) FILTER (WHERE state = 'succeeded') AS s,
       count(*) FILTER (WHERE state = 'failed') AS f,
       count(*) FILTER (WHERE state = 'skipped') AS k
FROM upd GROUP BY job_id
"""
)
_COMPLETE_NAMES = (
    "ids", "states", "delays", "errors", "worker",
    "p_task", "p_url", "p_final", "p_code", "p_ok", "p_depth", "p_ctype", "p_ms", "p_data",
    "p_error",
)  # fmt: skip
_COMPLETE_RAW = (positional(_COMPLETE_SQL.text, _COMPLETE_NAMES), _COMPLETE_NAMES)

# trawler_settle() (migration 0007): the jobs rows are locked by one statement and settled
# by the next, whose snapshot is taken after the locks were granted (see the migration)
_SETTLE_SQL = text(
    "SELECT * FROM trawler_settle(CAST(:jobs AS uuid[]), CAST(:n AS int[]), "
    "CAST(:r AS int[]), CAST(:s AS int[]), CAST(:f AS int[]), CAST(:k AS int[]), "
    "CAST(:l_job AS uuid[]), CAST(:l_url AS text[]), CAST(:l_hash AS bytea[]), "
    "CAST(:l_host AS text[]), CAST(:l_depth AS int[]), :channel)"
)
_SETTLE_NAMES = (
    "jobs", "n", "r", "s", "f", "k", "l_job", "l_url", "l_hash", "l_host", "l_depth",
    "channel",
)  # fmt: skip
_SETTLE_RAW = (positional(_SETTLE_SQL.text, _SETTLE_NAMES), _SETTLE_NAMES)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _complete_params(worker_id: uuid.UUID, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    pages = [(o.task_id, o.page) for o in outcomes if o.page is not None]
    return {
        "ids": [o.task_id for o in outcomes],
        "states": [o.state for o in outcomes],
        "delays": [o.retry_in_s for o in outcomes],
        "errors": [o.error for o in outcomes],
        "worker": worker_id,
        "p_task": [t for t, _ in pages],
        "p_url": [p.url for _, p in pages],
        "p_final": [p.final_url for _, p in pages],
        "p_code": [p.status_code for _, p in pages],
        "p_ok": [p.ok for _, p in pages],
        "p_depth": [p.depth for _, p in pages],
        "p_ctype": [p.content_type for _, p in pages],
        "p_ms": [p.elapsed_ms for _, p in pages],
        "p_data": [_dumps(p.data) for _, p in pages],
        "p_error": [p.error for _, p in pages],
    }


def _settle_params(
    deltas: Sequence[Sequence[Any]], links: Mapping[uuid.UUID, Sequence[tuple[str, int]]]
) -> dict[str, Any]:
    """Per-job counts (job, n, r, s, f, k) and new links; links deduplicated per job."""
    params: dict[str, Any] = {
        name: [row[i] for row in deltas] for i, name in enumerate(("jobs", "n", "r", "s", "f", "k"))
    }
    l_job: list[uuid.UUID] = []
    l_url: list[str] = []
    l_hash: list[bytes] = []
    l_host: list[str] = []
    l_depth: list[int] = []
    for job_id, found in links.items():
        seen: set[bytes] = set()
        for url, depth in found:
            digest = url_hash(url)
            if digest in seen:
                continue
            seen.add(digest)
            l_job.append(job_id)
            l_url.append(url)
            l_hash.append(digest)
            l_host.append(url_host(url))
            l_depth.append(depth)
    params.update(
        l_job=l_job, l_url=l_url, l_hash=l_hash, l_host=l_host, l_depth=l_depth,
        channel=NOTIFY_TASKS,
    )  # fmt: skip
    return params


async def _settle(
    conn: AsyncConnection,
    deltas: Sequence[Sequence[Any]],
    links: Mapping[uuid.UUID, Sequence[tuple[str, int]]],
    driver: Any = None,
) -> tuple[set[uuid.UUID], int]:
    """Apply per-job counts and add new links (see _SETTLE_SQL): the drained jobs and how
    many tasks were added."""
    if not deltas and not links:
        return set(), 0
    rows = await _fetch(conn, driver, _SETTLE_SQL, _SETTLE_RAW, _settle_params(deltas, links))
    return {row[0] for row in rows if row[1]}, sum(row[2] for row in rows)


async def complete(
    conn: AsyncConnection,
    worker_id: uuid.UUID,
    outcomes: Sequence[Outcome],
    *,
    driver: Any = None,
    before_settle: Callable[[], Awaitable[Any]] | None = None,
) -> list[uuid.UUID]:
    """Store a batch of outcomes; returns the jobs that reached a terminal state.

    With `driver` (the asyncpg connection under `conn`) the statements go straight to the
    driver; the caller then runs this inside a transaction opened on `driver`, with `conn`
    in AUTOCOMMIT mode so that finish_if_done (through `conn`) joins that transaction.
    `before_settle` runs more work of the transaction before the jobs rows are locked.
    """
    if not outcomes:
        return []
    deltas = await _fetch(
        conn, driver, _COMPLETE_SQL, _COMPLETE_RAW, _complete_params(worker_id, outcomes)
    )
    if before_settle is not None:
        await before_settle()
    # crawl links join the frontier in the same transaction, before the job can close
    links: dict[uuid.UUID, list[tuple[str, int]]] = {}
    for outcome in outcomes:
        if outcome.links:
            links.setdefault(outcome.job_id, []).extend(outcome.links)
    drained, _added = await _settle(conn, deltas, links, driver)
    # only a job left with nothing queued or leased can finish (its row is locked by this
    # transaction, so the counters just returned are the ones finish_if_done will see)
    return await finish_if_done(conn, drained)


async def enqueue_links(
    conn: AsyncConnection, job_id: uuid.UUID, links: Sequence[tuple[str, int]]
) -> int:
    """Add a crawl page's links as new tasks of its job; returns how many were new."""
    _drained, added = await _settle(conn, [], {job_id: links})
    return added


_RELEASE_SQL = text(
    """
WITH mine AS MATERIALIZED (
    -- in id order, the queue's lock order (see _COMPLETE_SQL)
    SELECT q.task_id, q.lease_owner FROM task_queue q
    WHERE q.lease_owner = :worker
      AND (CAST(:ids AS bigint[]) IS NULL OR q.task_id = ANY(CAST(:ids AS bigint[])))
      AND (CAST(:keep AS bigint[]) IS NULL
           OR (NOT q.task_id = ANY(CAST(:keep AS bigint[]))
               AND q.leased_at < now() - make_interval(secs => :older)))
    ORDER BY q.task_id
    FOR NO KEY UPDATE OF q
), upd AS (
    UPDATE task_queue q SET lease_owner = NULL, lease_expires_at = NULL, leased_at = NULL,
                            fetched_at = NULL, attempts = greatest(q.attempts - 1, 0)
    FROM mine
    WHERE q.task_id = mine.task_id AND mine.lease_owner = :worker
    RETURNING q.job_id
), per_job AS (
    SELECT job_id, count(*) AS n FROM upd GROUP BY job_id
), locked AS MATERIALIZED (
    SELECT j.id FROM jobs j JOIN per_job p ON p.job_id = j.id ORDER BY j.id FOR NO KEY UPDATE OF j
), counted AS (
    UPDATE jobs j SET running = j.running - p.n, queued = j.queued + p.n, updated_at = now()
    FROM per_job p, locked l WHERE j.id = p.job_id AND l.id = j.id
)
SELECT count(*) FROM upd
"""
)


async def release(
    conn: AsyncConnection,
    worker_id: uuid.UUID,
    task_ids: Sequence[int] | None = None,
    *,
    keep: Sequence[int] | None = None,
    older_than_s: float = 0.0,
) -> int:
    """Give this worker's leases back: all, or `task_ids`, or (orphans) all but `keep`
    that were leased more than `older_than_s` ago."""
    params = {
        "worker": worker_id,
        "ids": list(task_ids) if task_ids is not None else None,
        "keep": list(keep) if keep is not None else None,
        "older": older_than_s,
    }
    count = (await conn.execute(_RELEASE_SQL, params)).scalar_one()
    if count:
        await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_TASKS})
    return int(count)


# Leases whose holder is gone: the lease ran out, or the worker stopped heartbeating.
# They go back to the queue (the crash is not the URL's fault) unless the task has used
# up its attempts, in which case it fails with an error page.
_RECOVER_SQL = text(
    """
WITH lost AS (
    SELECT q.task_id, q.attempts FROM task_queue q
    WHERE q.lease_owner IS NOT NULL
      AND (q.lease_expires_at < now()
           OR q.lease_owner IN (
               SELECT w.id FROM workers w
               WHERE w.state = 'stopped'
                  OR w.heartbeat_at < now() - make_interval(secs => :stale)))
    ORDER BY q.task_id
    LIMIT :n
    FOR UPDATE OF q SKIP LOCKED
), x AS (
    SELECT l.task_id, l.attempts, l.attempts >= t.max_attempts AS exhausted
    FROM lost l JOIN tasks t ON t.id = l.task_id
), ended AS (
    DELETE FROM task_queue q USING x WHERE q.task_id = x.task_id AND x.exhausted
), back AS (
    UPDATE task_queue q SET lease_owner = NULL, lease_expires_at = NULL, leased_at = NULL,
                            fetched_at = NULL
    FROM x WHERE q.task_id = x.task_id AND NOT x.exhausted
), upd AS (
    UPDATE tasks t SET
        status = CASE WHEN x.exhausted THEN 'failed' ELSE 'queued' END,
        attempts = x.attempts, updated_at = now(), last_error = 'lease expired: worker lost'
    FROM x WHERE t.id = x.task_id
    RETURNING t.id, t.job_id, t.url, t.depth, t.status
), per_job AS (
    SELECT job_id, count(*) AS n,
           count(*) FILTER (WHERE status = 'queued') AS q,
           count(*) FILTER (WHERE status = 'failed') AS f
    FROM upd GROUP BY job_id
), locked AS MATERIALIZED (
    SELECT j.id FROM jobs j JOIN per_job p ON p.job_id = j.id ORDER BY j.id FOR NO KEY UPDATE OF j
), counted AS (
    UPDATE jobs j SET running = j.running - p.n, queued = j.queued + p.q,
                      failed = j.failed + p.f, updated_at = now()
    FROM per_job p, locked l WHERE j.id = p.job_id AND l.id = j.id
), stored AS (
    INSERT INTO pages (job_id, task_id, url, ok, depth, error)
    SELECT job_id, id, url, false, depth, 'worker lost while fetching; attempts exhausted'
    FROM upd WHERE status = 'failed'
    ON CONFLICT (task_id) DO NOTHING
)
SELECT job_id, status FROM upd
"""
)


async def recover_lost(conn: AsyncConnection, stale_s: float, limit: int = 1000) -> int:
    """Requeue tasks held by dead workers; returns how many were recovered."""
    rows = (await conn.execute(_RECOVER_SQL, {"stale": stale_s, "n": limit})).all()
    if not rows:
        return 0
    failed_jobs = {r[0] for r in rows if r[1] == "failed"}
    await finish_if_done(conn, failed_jobs)
    await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_TASKS})
    return len(rows)


_RENEW_SQL = text(
    """
WITH d AS MATERIALIZED (
    -- by primary key, the lease checked on the locked rows (see _COMPLETE_SQL)
    SELECT d.task_id, d.lease_owner FROM task_queue d
    WHERE d.task_id = ANY(CAST(:held AS bigint[]))
    ORDER BY d.task_id
    FOR NO KEY UPDATE OF d SKIP LOCKED
)
-- lease_expires_at is in no index: a HOT update
UPDATE task_queue q SET lease_expires_at = now() + make_interval(secs => :lease)
FROM d
WHERE q.task_id = d.task_id AND d.lease_owner = :worker
"""
)


async def renew_leases(
    conn: AsyncConnection, worker_id: uuid.UUID, lease_s: float, held: Sequence[int]
) -> int:
    """Extend the leases of the tasks this worker really holds (and only those: a lease it
    owns without knowing, from a claim whose COMMIT answer was lost, must run out).

    A row locked right now is skipped, not waited for: its completion (this worker's
    writer) or its cancellation holds it, and ends the lease anyway. Waiting could deadlock
    with the writer, which locks its rows in another order (measured: with a beat every
    0.2 s on a busy no-op queue, most beats and many completions died as deadlock victims,
    each after deadlock_timeout). A skipped row still leased gets its lease renewed at the
    next beat, well within the lease (lease_seconds is several beats).
    """
    result = await conn.execute(
        _RENEW_SQL, {"worker": worker_id, "lease": lease_s, "held": list(held)}
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def next_due_in(conn: AsyncConnection) -> float | None:
    """Seconds until the earliest queued task becomes due (None: nothing queued)."""
    value = (
        await conn.execute(
            text(
                "SELECT extract(epoch FROM min(next_attempt_at) - now()) FROM task_queue "
                "WHERE lease_owner IS NULL"
            )
        )
    ).scalar_one_or_none()
    return None if value is None else max(0.0, float(value))
