"""Job management: submit, read, list, pages, cancel, retry, resume, delete, bulk — tenant-scoped
SQL.

Every statement carries `tenant = :tenant`: another tenant's job is indistinguishable from
a missing one (404), enforced by the database query, not by filtering afterwards.

Functions only execute and flush; the caller's unit of work commits (the request session
commits before the response is sent). NOTIFYs issued here are delivered on that commit.
One exception: submit_job, a single atomic statement, commits by itself on a session that
has not begun a transaction (see there).

Lock order: cancel follows the queue's order (task rows, then the job row) because it
races with claims and completions on live jobs. Retry and delete lock the job row first:
they act only on terminal jobs, whose tasks no claim or completion touches, and taking the
job row first serialises them against each other on the same job.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import Select, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.api.schemas import (
    BulkAction,
    BulkItemPublic,
    BulkOutcome,
    BulkResultPublic,
    JobPublic,
    JobSpecBase,
    PagePublic,
    ProgressPublic,
)
from app.database.connection import ConnectionManager
from app.database.models import Job, JobKind, JobStatus
from app.database.statements import Statement
from app.errors import UNSTORABLE_TEXT, Conflict, NotFound, Unprocessable
from app.scraper.ssrf import BlockedTarget, SSRFGuard
from app.services import state
from app.services.frontier import prepare
from app.services.queue import NOTIFY_TASKS

Conn = AsyncSession | AsyncConnection

_JOB_COLUMNS = (
    "id, kind, status, priority, created_at, started_at, finished_at, "
    "total, queued, running, succeeded, failed, error, spec"
)
_ACTIVE = (JobStatus.queued.value, JobStatus.running.value)


def job_from_row(row: Mapping[Any, Any]) -> JobPublic:
    """A jobs row (the _JOB_COLUMNS) as the API resource."""
    return JobPublic(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        priority=row["priority"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        progress=ProgressPublic(
            total=row["total"],
            queued=row["queued"],
            running=row["running"],
            succeeded=row["succeeded"],
            failed=row["failed"],
        ),
        error=row["error"],
        spec=row["spec"],
    )


_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


async def _conn(
    conn: Conn, *, read_only: bool = False, one_statement: bool = False
) -> AsyncConnection:
    """Core statements on the session's own connection: no ORM overhead.

    read_only: the caller runs one read-only statement. If the request has not used its
    connection yet, it is taken in AUTOCOMMIT, which saves the BEGIN and COMMIT round
    trips (half the database time of a hot read; one statement is its own consistent
    snapshot anyway). A connection already in use keeps its transaction. Never pass it
    from code that writes afterwards on the same session.

    one_statement: the caller's whole unit of work is one statement that is atomic by
    itself (submit_job). On an unused session it runs in AUTOCOMMIT too, so it commits as
    it completes; inside a transaction the session already began, it joins it.
    """
    if isinstance(conn, AsyncSession):
        fresh = (read_only or one_statement) and not conn.in_transaction()
        return await conn.connection(execution_options=_AUTOCOMMIT if fresh else None)
    return conn


# --------------------------------------------------------------------------------------
# Submit


def request_hash(request: JobSpecBase) -> str:
    """sha256 of the canonical JSON of the validated request (defaults filled in)."""
    canonical = {"kind": request.kind.value, "request": request.model_dump(mode="json")}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


# One round trip: the job row with its counters already set, every task (the URLs are
# deduplicated beforehand, so no ON CONFLICT is needed there), and, unless :notify is
# false, the executor wake-up, which PostgreSQL delivers only when this transaction
# commits. With an idempotency key already taken, the job CTE inserts nothing, so neither
# do the tasks; the caller then reads the winner.
_SUBMIT = Statement(
    f"""
WITH job AS (
    INSERT INTO jobs (id, tenant, kind, priority, max_attempts, spec, idempotency_key,
                      request_hash, total, queued, retain_days)
    VALUES (:id, :tenant, :kind, :priority, :max_attempts, CAST(:spec AS jsonb),
            :idempotency_key, :request_hash, :n, :n, CAST(:retain_days AS int))
    ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {_JOB_COLUMNS}
), hook AS (
    -- the job's webhook (its secret and headers stay out of jobs.spec)
    INSERT INTO job_webhooks (job_id, url, events, headers, secret)
    SELECT job.id, CAST(:wh_url AS text), CAST(:wh_events AS varchar(32)[]),
           CAST(:wh_headers AS jsonb), CAST(:wh_secret AS text)
    FROM job WHERE CAST(:wh_url AS text) IS NOT NULL
), tasks AS (
    INSERT INTO tasks (job_id, url, url_hash, host, depth, priority, max_attempts)
    SELECT job.id, u.url, u.url_hash, u.host, 0, :priority, :max_attempts
    FROM job CROSS JOIN unnest(CAST(:urls AS text[]), CAST(:hashes AS bytea[]),
                               CAST(:hosts AS text[])) AS u(url, url_hash, host)
), host_rows AS (
    -- every task's host has a politeness row (the claim counts leases there). An existing
    -- row is left as it is without locking it: DO NOTHING takes no row lock, whereas
    -- DO UPDATE locks the row until commit even when its WHERE rejects the update, which
    -- queued every submission for a popular host behind the previous one's commit.
    INSERT INTO hosts (host, max_concurrency, delay_ms)
    SELECT DISTINCT u.host, CAST(:default_host_limit AS int),
           coalesce(CAST(:host_delay_ms AS int), 0)
    FROM job CROSS JOIN unnest(CAST(:hosts AS text[])) AS u(host)
    WHERE CAST(:host_limit AS int) IS NULL
    ON CONFLICT (host) DO NOTHING
), host_limits AS (
    -- a crawl's own politeness settings become its seed hosts' limits
    INSERT INTO hosts (host, max_concurrency, delay_ms)
    SELECT DISTINCT u.host, CAST(:host_limit AS int), coalesce(CAST(:host_delay_ms AS int), 0)
    FROM job CROSS JOIN unnest(CAST(:hosts AS text[])) AS u(host)
    WHERE CAST(:host_limit AS int) IS NOT NULL
    ON CONFLICT (host) DO UPDATE SET
        max_concurrency = EXCLUDED.max_concurrency, delay_ms = EXCLUDED.delay_ms,
        updated_at = now()
), wake AS (
    -- a committing transaction that has sent a NOTIFY holds a database-wide lock until
    -- its commit is flushed: concurrent submissions that all notify commit one at a time
    -- (bench/submit_statement.py); the API coalesces its wake-ups instead (TaskWaker)
    SELECT pg_notify('{NOTIFY_TASKS}', '') FROM job WHERE CAST(:notify AS boolean)
)
SELECT job.*, (SELECT count(*) FROM wake) AS notified FROM job
"""
)

_BY_IDEMPOTENCY_KEY = Statement(
    f"SELECT {_JOB_COLUMNS}, request_hash FROM jobs "
    "WHERE tenant = :tenant AND idempotency_key = :key"
)


def _prepare_urls(
    urls: Sequence[str], guard: SSRFGuard | None
) -> list[tuple[str, bytes, str, int]]:
    try:
        rows = prepare((url, 0) for url in urls)
    except ValueError as error:  # the schema validated them; this is a second line only
        raise Unprocessable(f"invalid URL: {error}") from None
    if guard is not None and not guard.allow_private:
        for canonical, _, _, _ in rows:
            try:
                guard.check_url(canonical)
            except BlockedTarget as error:
                raise Unprocessable(
                    f"URL {canonical[:200]!r} is not allowed: {error}. Private and local "
                    "targets need TRAWLER_ALLOW_PRIVATE_NETWORKS or TRAWLER_ALLOWED_CIDRS."
                ) from None
    return rows


def check_webhook(request: JobSpecBase, guard: SSRFGuard | None) -> None:
    """The SSRF guard applies to a webhook URL as to a target (checked again at delivery,
    on every resolved address)."""
    if request.webhook is None or guard is None or guard.allow_private:
        return
    try:
        guard.check_url(request.webhook.url)
    except BlockedTarget as error:
        raise Unprocessable(
            f"webhook URL {request.webhook.url[:200]!r} is not allowed: {error}. Private and "
            "local receivers need TRAWLER_ALLOW_PRIVATE_NETWORKS or TRAWLER_ALLOWED_CIDRS."
        ) from None


def check_request(request: JobSpecBase, guard: SSRFGuard | None) -> None:
    """Everything submit_job refuses before writing: URLs and the webhook URL (422)."""
    _prepare_urls(request.start_urls(), guard)
    check_webhook(request, guard)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A submission checked and ready to insert (prepare_submission)."""

    rows: list[tuple[str, bytes, str, int]]
    spec: str  # jobs.spec as JSON text
    retain_days: int | None


def prepare_submission(
    request: JobSpecBase, guard: SSRFGuard | None, default_retain_days: int | None
) -> Prepared:
    """Everything submit_job refuses before writing (422), done without the database: the
    API runs it before the tenant's limits are consulted, so that a refused request leaves
    even the tenant's rate allowance as it was."""
    rows = _prepare_urls(request.start_urls(), guard)
    check_webhook(request, guard)
    retain_days = retain_days_of(request, default_retain_days)
    spec = request.stored_spec()
    if retain_days is not None:
        spec["retain_days"] = retain_days
    try:
        spec_json = orjson.dumps(spec).decode()
    except orjson.JSONEncodeError as error:
        # free-form parts (the Firecrawl options kept in the spec) can hold any JSON
        raise Unprocessable(f"the request holds a value that cannot be stored: {error}") from None
    if "\\u0000" in spec_json:  # jsonb refuses it (the database answer is a 422 too)
        raise Unprocessable(UNSTORABLE_TEXT)
    return Prepared(rows, spec_json, retain_days)


def retain_days_of(request: JobSpecBase, default: int | None) -> int | None:
    """retain_days as given (null: forever), or the server default when omitted."""
    return request.retain_days if "retain_days" in request.model_fields_set else default


def _webhook_params(request: JobSpecBase) -> dict[str, Any]:
    hook = request.webhook
    return {
        "wh_url": hook.url if hook is not None else None,
        "wh_events": list(hook.events) if hook is not None else None,
        "wh_headers": orjson.dumps(hook.headers).decode() if hook is not None else None,
        "wh_secret": hook.secret if hook is not None else None,
    }


def _host_politeness(request: JobSpecBase, default_limit: int) -> dict[str, int | None]:
    politeness = getattr(request, "politeness", None)
    return {
        "default_host_limit": default_limit,
        "host_limit": politeness.per_host_concurrency if politeness is not None else None,
        "host_delay_ms": politeness.delay_ms if politeness is not None else None,
    }


async def submit_job(
    session: AsyncSession | asyncpg.Connection,
    tenant: str,
    request: JobSpecBase,
    *,
    guard: SSRFGuard | None = None,
    idempotency_key: str | None = None,
    default_host_limit: int = 8,
    default_retain_days: int | None = None,
    prepared: Prepared | None = None,
    notify: bool = True,
) -> tuple[JobPublic, bool]:
    """Insert the job and its tasks; returns (job, created).

    created is False when `idempotency_key` was already used by this tenant with the
    same request (the existing job is returned); a different request raises Conflict.

    The job, its tasks, their hosts and the executor wake-up are one statement. On a
    session that has not begun a transaction (the API's, the CLI's) that statement runs
    in autocommit: the job is committed when this returns, two round trips sooner than
    BEGIN ... COMMIT and with the row locks held only while the statement runs. Callers
    that need the job in a larger unit of work begin it first (any statement on the
    session); the submission then joins that transaction and commits with it.

    `session` may also be the asyncpg connection of a pooled connection
    (ConnectionManager.driver(), the API's submissions): the same statements go straight
    to the driver, autocommitting unless the caller opened a transaction there.

    `prepared`: the request already through prepare_submission (with this guard and
    default), which is then not repeated. `notify=False`: no executor wake-up in the
    statement; the caller sends one after the commit (app.services.wakeups.TaskWaker).
    """
    if prepared is None:
        prepared = prepare_submission(request, guard, default_retain_days)
    rows = prepared.rows
    digest = request_hash(request) if idempotency_key is not None else None
    conn = (
        session
        if isinstance(session, asyncpg.Connection)
        else await _conn(session, one_statement=True)
    )
    params = {
        "tenant": tenant,
        "kind": request.kind.value,
        "priority": request.priority,
        "max_attempts": request.max_attempts,
        "spec": prepared.spec,
        "retain_days": prepared.retain_days,
        **_webhook_params(request),
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "n": len(rows),
        "urls": [r[0] for r in rows],
        "hashes": [r[1] for r in rows],
        "hosts": [r[2] for r in rows],
        **_host_politeness(request, default_host_limit),
        "notify": notify,
    }
    # A taken key normally means one loop: insert nothing, read the winner. A winner
    # deleted between the two statements frees the key, so the insert is tried again.
    for _ in range(3):
        row = await _SUBMIT.fetch_one(conn, {**params, "id": uuid.uuid4()})
        if row is not None:
            return job_from_row(row), True
        # ON CONFLICT waited for the competing transaction to commit, so a new statement
        # (READ COMMITTED) sees its job
        existing = await _BY_IDEMPOTENCY_KEY.fetch_one(
            conn, {"tenant": tenant, "key": idempotency_key}
        )
        if existing is None:
            continue
        if existing["request_hash"] != digest:
            raise Conflict(
                f"Idempotency-Key {idempotency_key!r} was already used with a different "
                f"request (job {existing['id']}); use a new key for a new request",
                extra={"job_id": str(existing["id"])},
            )
        return job_from_row(existing), False
    raise Conflict(f"Idempotency-Key {idempotency_key!r} is contended; retry the request")


# --------------------------------------------------------------------------------------
# Reads


_GET_SQL = text(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = :id AND tenant = :tenant")


async def get_job(conn: Conn, tenant: str, job_id: uuid.UUID) -> JobPublic | None:
    """The hot read: one Core statement, the row mapped straight to the resource."""
    connection = await _conn(conn, read_only=True)
    row = (
        (await connection.execute(_GET_SQL, {"id": job_id, "tenant": tenant}))
        .mappings()
        .one_or_none()
    )
    return None if row is None else job_from_row(row)


# GET /jobs/{id}, the hottest read: asyncpg's own parameter style; the spec as JSON text,
# parsed by orjson rather than by the json module behind the driver's jsonb codec; the id
# is the one asked for
_GET_JSON_SQL = (
    "SELECT kind, status, priority, created_at, started_at, finished_at, "
    "total, queued, running, succeeded, failed, error, spec::text AS spec "
    "FROM jobs WHERE id = $1 AND tenant = $2"
)


async def get_job_json(db: ConnectionManager, tenant: str, job_id: uuid.UUID) -> bytes | None:
    """The job resource as JSON bytes (exactly JobPublic's JSON), or None when not found.

    For the route that only sends it on: one autocommit statement on the driver
    connection and the row serialised by orjson, no session, no model validation.
    """
    row = await db.fetchrow(_GET_JSON_SQL, job_id, tenant)
    if row is None:
        return None
    return orjson.dumps(
        {
            "id": job_id,
            "kind": row["kind"],
            "status": row["status"],
            "priority": row["priority"],
            "created_at": row["created_at"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
            "progress": {
                "total": row["total"],
                "queued": row["queued"],
                "running": row["running"],
                "succeeded": row["succeeded"],
                "failed": row["failed"],
            },
            "error": row["error"],
            "spec": orjson.loads(row["spec"]),
        },
        option=orjson.OPT_UTC_Z,
    )


async def require_job(conn: Conn, tenant: str, job_id: uuid.UUID) -> JobPublic:
    job = await get_job(conn, tenant, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


@dataclass(frozen=True, slots=True)
class JobFilters:
    statuses: Sequence[JobStatus] = ()
    kind: JobKind | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


JobKey = tuple[datetime, uuid.UUID]
"""Keyset position in a job listing: (created_at, id) of the last row seen."""

_jobs = Job.__table__


def _list_query(tenant: str, filters: JobFilters, after: JobKey | None, limit: int) -> Select[Any]:
    c = _jobs.c
    stmt = select(
        c.id, c.kind, c.status, c.priority, c.created_at, c.started_at, c.finished_at,
        c.total, c.queued, c.running, c.succeeded, c.failed, c.error, c.spec,
    ).where(c.tenant == tenant)  # fmt: skip
    if filters.statuses:
        stmt = stmt.where(c.status.in_(list(filters.statuses)))
    if filters.kind is not None:
        stmt = stmt.where(c.kind == filters.kind)
    if filters.created_after is not None:
        stmt = stmt.where(c.created_at >= filters.created_after)
    if filters.created_before is not None:
        stmt = stmt.where(c.created_at < filters.created_before)
    if after is not None:
        # row comparison: served by ix_jobs_tenant_created scanned backwards
        stmt = stmt.where(tuple_(c.created_at, c.id) < tuple_(*after))
    return stmt.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)


async def list_jobs(
    conn: Conn,
    tenant: str,
    filters: JobFilters,
    *,
    limit: int = 50,
    after: JobKey | None = None,
) -> tuple[list[JobPublic], JobKey | None]:
    """Newest first; returns the page and the key to continue after (None: last page)."""
    connection = await _conn(conn, read_only=True)
    rows = (await connection.execute(_list_query(tenant, filters, after, limit))).mappings()
    items = [job_from_row(row) for row in rows]
    if len(items) <= limit:
        return items, None
    items = items[:limit]
    return items, (items[-1].created_at, items[-1].id)


# One round trip for "404 or a page of results": the job row (tenant-scoped) joined to
# at most n+1 of its pages after the cursor. No row at all means no such job.
_PAGES_SQL = text(
    """
SELECT j.id AS job_id, p.id, p.url, p.final_url, p.status_code, p.ok, p.depth,
       p.fetched_at, p.elapsed_ms, p.data, p.error
FROM jobs j
LEFT JOIN LATERAL (
    SELECT * FROM pages
    WHERE pages.job_id = j.id AND pages.id > :after
      AND (CAST(:ok AS boolean) IS NULL OR pages.ok = CAST(:ok AS boolean))
    ORDER BY pages.id
    LIMIT :n
) p ON true
WHERE j.id = :job AND j.tenant = :tenant
ORDER BY p.id
"""
)


async def list_pages(
    conn: Conn,
    tenant: str,
    job_id: uuid.UUID,
    *,
    ok: bool | None = None,
    limit: int = 50,
    after: int = 0,
) -> tuple[list[PagePublic], int | None]:
    """Stored results in id order; returns the page and the id to continue after."""
    connection = await _conn(conn, read_only=True)
    rows = (
        (
            await connection.execute(
                _PAGES_SQL,
                {"job": job_id, "tenant": tenant, "after": after, "ok": ok, "n": limit + 1},
            )
        )
        .mappings()
        .all()
    )
    if not rows:
        raise NotFound(f"job {job_id} not found")
    found = [row for row in rows if row["id"] is not None]
    items = [
        PagePublic(
            url=row["url"],
            final_url=row["final_url"],
            status_code=row["status_code"],
            ok=row["ok"],
            depth=row["depth"],
            fetched_at=row["fetched_at"],
            elapsed_ms=row["elapsed_ms"],
            data=row["data"],
            error=row["error"],
        )
        for row in found[:limit]
    ]
    next_after = int(found[limit - 1]["id"]) if len(found) > limit else None
    return items, next_after


# --------------------------------------------------------------------------------------
# Cancel


_STATUS_SQL = text("SELECT status FROM jobs WHERE id = :id AND tenant = :tenant")
_STATUS_FOR_UPDATE_SQL = text(
    "SELECT status FROM jobs WHERE id = :id AND tenant = :tenant FOR UPDATE"
)

# The job's queue rows first (the queue's lock order), taken in id order so two statements
# locking overlapping task sets do not cross, and deleted; then their tasks rows. Leased
# tasks are cancelled too: the worker holding one cannot complete it any more (completion
# needs its queue row), and the NOTIFY of the transition makes it abort the fetch. A row
# that a completion deleted while we waited for it is skipped, so that task keeps its
# outcome.
_CANCEL_TASKS_SQL = text(
    """
WITH locked AS MATERIALIZED (
    -- waiting rows by ix_task_queue_job_id, leased ones among all leased rows (a few per
    -- worker slot; ix_task_queue_leased)
    SELECT q.task_id FROM task_queue q
    WHERE q.task_id = ANY(ARRAY(
            SELECT w.task_id FROM task_queue w WHERE w.job_id = :id AND w.lease_owner IS NULL
            UNION ALL
            SELECT l.task_id FROM task_queue l
            WHERE l.job_id = :id AND l.lease_owner IS NOT NULL))
      AND q.job_id = :id
      AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = :id AND jobs.tenant = :tenant)
    ORDER BY q.task_id
    FOR UPDATE OF q
), ended AS (
    DELETE FROM task_queue q USING locked WHERE q.task_id = locked.task_id
    RETURNING q.task_id, q.attempts
)
UPDATE tasks t SET status = 'cancelled', attempts = ended.attempts, updated_at = now()
FROM ended WHERE t.id = ended.task_id
"""
)
_ZERO_ACTIVE_SQL = text(
    "UPDATE jobs SET queued = 0, running = 0, updated_at = now() "
    "WHERE id = :id AND tenant = :tenant AND status IN ('queued', 'running')"
)


async def _status(conn: AsyncConnection, tenant: str, job_id: uuid.UUID, lock: bool) -> str:
    sql = _STATUS_FOR_UPDATE_SQL if lock else _STATUS_SQL
    status = (await conn.execute(sql, {"id": job_id, "tenant": tenant})).scalar_one_or_none()
    if status is None:
        raise NotFound(f"job {job_id} not found")
    return str(status)


async def cancel_job(session: AsyncSession, tenant: str, job_id: uuid.UUID) -> JobPublic:
    """Cancel a queued or running job; cancelling a cancelled job returns it unchanged.

    Conflict once it completed or failed.
    """
    conn = await _conn(session)
    status = await _status(conn, tenant, job_id, lock=False)
    if status == JobStatus.cancelled:
        return await require_job(conn, tenant, job_id)
    if status not in _ACTIVE:
        raise Conflict(f"job {job_id} is already {status}; only queued or running jobs cancel")
    params = {"id": job_id, "tenant": tenant}
    await conn.execute(_CANCEL_TASKS_SQL, params)
    await conn.execute(_ZERO_ACTIVE_SQL, params)
    moved = await state.transition(conn, job_id, JobStatus.cancelled)
    if not moved:
        # it finished (or was cancelled) between our read and our update
        job = await require_job(conn, tenant, job_id)
        if job.status != JobStatus.cancelled:
            raise Conflict(f"job {job_id} is already {job.status.value}")
        return job
    return await require_job(conn, tenant, job_id)


# --------------------------------------------------------------------------------------
# Retry


def _requeue_sql(status: str, drop_pages: bool) -> Any:
    """A job's tasks in `status` back to the queue (new queue rows), attempts from zero;
    returns how many. With `drop_pages`, their pages go (a retry fetches them again)."""
    dropped = (
        "), dropped AS (\n    DELETE FROM pages WHERE task_id IN (SELECT id FROM requeued)\n"
        if drop_pages
        else ""
    )
    return text(
        f"""
WITH requeued AS (
    UPDATE tasks SET status = 'queued', attempts = 0, next_attempt_at = now(),
                     last_error = NULL, updated_at = now()
    WHERE job_id = :id AND status = '{status}'
      AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = :id AND jobs.tenant = :tenant)
    RETURNING id, job_id, host, priority, next_attempt_at
), queued AS (
    INSERT INTO task_queue (task_id, job_id, host, priority, next_attempt_at)
    SELECT id, job_id, host, priority, next_attempt_at FROM requeued
    ON CONFLICT (task_id) DO NOTHING
{dropped})
SELECT count(*) FROM requeued
"""
    )


_REQUEUE_FAILED_SQL = _requeue_sql("failed", drop_pages=True)

# Counters recomputed from the tasks themselves rather than adjusted: a retry is rare
# and this leaves them exactly right whatever happened before.
_RECOUNT_SQL = text(
    """
UPDATE jobs j SET
    total = c.total, queued = c.queued, running = c.running,
    succeeded = c.succeeded, failed = c.failed, updated_at = now()
FROM (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE t.status = 'queued' AND q.lease_owner IS NULL) AS queued,
           count(*) FILTER (WHERE q.lease_owner IS NOT NULL) AS running,
           count(*) FILTER (WHERE t.status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE t.status = 'failed') AS failed
    FROM tasks t LEFT JOIN task_queue q ON q.task_id = t.id WHERE t.job_id = :id
) c
WHERE j.id = :id AND j.tenant = :tenant
"""
)


async def retry_job(session: AsyncSession, tenant: str, job_id: uuid.UUID) -> JobPublic:
    """Re-queue the failed tasks of a finished job (their pages are dropped).

    Conflict while the job is queued or running, and when nothing failed.
    """
    conn = await _conn(session)
    status = await _status(conn, tenant, job_id, lock=True)
    if status in _ACTIVE:
        raise Conflict(f"job {job_id} is {status}; retry it once it has finished")
    params = {"id": job_id, "tenant": tenant}
    requeued = int((await conn.execute(_REQUEUE_FAILED_SQL, params)).scalar_one())
    if requeued == 0:
        raise Conflict(f"job {job_id} has no failed tasks to retry")
    await conn.execute(_RECOUNT_SQL, params)
    await state.transition(conn, job_id, JobStatus.queued, data={"retried": requeued})
    await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_TASKS})
    return await require_job(conn, tenant, job_id)


# --------------------------------------------------------------------------------------
# Resume


# The cancelled tasks go back to the queue: a cancelled crawl continues from its frontier
# (links found before the cancel were enqueued as tasks and were cancelled with it). Their
# attempts start again: a cancellation is not the URL's failure.
_REQUEUE_CANCELLED_SQL = _requeue_sql("cancelled", drop_pages=False)


async def resume_job(session: AsyncSession, tenant: str, job_id: uuid.UUID) -> JobPublic:
    """Continue a cancelled job where it stopped: its cancelled tasks are queued again.

    Conflict unless the job is cancelled, and when no task was left to do. The job row is
    locked first, as in retry: a cancelled job's tasks are touched by no claim.
    """
    conn = await _conn(session)
    status = await _status(conn, tenant, job_id, lock=True)
    if status != JobStatus.cancelled:
        raise Conflict(f"job {job_id} is {status}; only a cancelled job can be resumed")
    params = {"id": job_id, "tenant": tenant}
    resumed = int((await conn.execute(_REQUEUE_CANCELLED_SQL, params)).scalar_one())
    if resumed == 0:
        raise Conflict(f"job {job_id} has no cancelled tasks left to resume")
    await conn.execute(_RECOUNT_SQL, params)
    await state.transition(conn, job_id, JobStatus.queued, data={"resumed": resumed})
    await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_TASKS})
    return await require_job(conn, tenant, job_id)


# --------------------------------------------------------------------------------------
# Delete


async def delete_job(session: AsyncSession, tenant: str, job_id: uuid.UUID) -> None:
    """Delete a finished job; its tasks, pages and events go by ON DELETE CASCADE.

    Conflict while it is queued or running (cancel it first).
    """
    job = (
        await session.scalars(
            select(Job).where(Job.id == job_id, Job.tenant == tenant).with_for_update()
        )
    ).one_or_none()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    if job.status in _ACTIVE:
        raise Conflict(f"job {job_id} is {job.status.value}; cancel it before deleting it")
    await session.delete(job)
    await session.flush()


# --------------------------------------------------------------------------------------
# Bulk


@dataclass
class _Tally:
    results: list[BulkItemPublic] = field(default_factory=list)

    def add(
        self,
        job_id: uuid.UUID,
        outcome: BulkOutcome,
        status: JobStatus | None = None,
        detail: str | None = None,
    ) -> None:
        item = BulkItemPublic(id=job_id, outcome=outcome, status=status, detail=detail)
        self.results.append(item)

    def counts(self) -> dict[BulkOutcome, int]:
        counts: dict[BulkOutcome, int] = {"ok": 0, "not_found": 0, "conflict": 0}
        for item in self.results:
            counts[item.outcome] += 1
        return counts


async def bulk(
    session: AsyncSession, tenant: str, action: BulkAction, ids: Sequence[uuid.UUID]
) -> BulkResultPublic:
    """Apply one action to many jobs; each id gets its own outcome.

    Each job runs in a SAVEPOINT, so a job refused half-way leaves nothing behind while
    the others' changes stand; all of it commits together with the request.
    """
    tally = _Tally()
    for job_id in dict.fromkeys(ids):  # de-duplicated, order kept
        try:
            async with session.begin_nested():
                if action == "cancel":
                    job = await cancel_job(session, tenant, job_id)
                    tally.add(job_id, "ok", job.status)
                elif action == "retry":
                    job = await retry_job(session, tenant, job_id)
                    tally.add(job_id, "ok", job.status)
                else:
                    await delete_job(session, tenant, job_id)
                    tally.add(job_id, "ok")
        except NotFound as error:
            tally.add(job_id, "not_found", detail=error.detail)
        except Conflict as error:
            tally.add(job_id, "conflict", detail=error.detail)
    return BulkResultPublic(action=action, results=tally.results, counts=tally.counts())
