"""Operator actions and figures: workers, queue, pause/resume, drain, lease recovery, purge,
API keys, the audit trail; and the per-tenant submission limits.

Every admin action that changes something runs as an explicit unit of work here: the
change and its `admin_audit` row commit together, and the log line is written once the
commit succeeded. A refused action (unknown id, wrong state) changes nothing and is still
audited, as a row with ok = false. Purge is the exception to "one unit of work": it deletes
in bounded batches, each committed, and audits the total at the end (also after a
failure, with what it had deleted by then).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

import asyncpg
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.models import (
    TERMINAL_JOB_STATUSES,
    AdminAudit,
    ApiKey,
    Job,
    JobStatus,
    KeyRole,
    WorkerState,
)
from app.database.statements import Executor, Statement
from app.errors import Conflict, NotFound, TooManyRequests, TrawlerError
from app.logging import request_id_var
from app.services import apikeys, queue
from app.services.apikeys import Principal
from app.services.retention import delete_jobs

logger = logging.getLogger(__name__)

T = TypeVar("T")

NOTIFY_WORKERS = "trawler_workers"  # payload: the id of a worker asked to drain


# --------------------------------------------------------------------------------------
# Resources


class WorkerPublic(BaseModel):
    id: uuid.UUID
    hostname: str
    pid: int
    version: str
    concurrency: int
    in_flight: int = Field(description="tasks the worker reported running at its last heartbeat")
    leased: int = Field(description="tasks leased to the worker right now")
    state: WorkerState
    stale: bool = Field(description="not stopped, but silent for worker_stale_seconds")
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float


class WorkerListPublic(BaseModel):
    items: list[WorkerPublic]
    live: int
    stale: int


class PriorityDepth(BaseModel):
    priority: int
    queued: int
    due: int
    leased: int


class QueuePublic(BaseModel):
    paused: bool
    paused_changed_at: datetime | None
    by_status: dict[str, int] = Field(description="tasks queued (due or delayed) and leased")
    by_priority: list[PriorityDepth]
    oldest_queued_age_s: float | None = Field(
        description="how long the longest-waiting due task has waited (since it was created "
        "or its retry came due)"
    )
    expired_leases: int
    jobs_by_status: dict[str, int]


class PausePublic(BaseModel):
    paused: bool
    changed: bool
    since: datetime


class RequeuePublic(BaseModel):
    recovered: int


PurgeStatus = Literal["completed", "failed", "cancelled"]
_PURGE_STATUSES: tuple[PurgeStatus, ...] = ("completed", "failed", "cancelled")


class PurgeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # strict: lax validation read `false` as 0, i.e. "purge every finished job"
    older_than_s: int = Field(
        strict=True, ge=0, le=100 * 365 * 86400, description="finished this long ago"
    )
    statuses: list[PurgeStatus] = Field(default_factory=lambda: list(_PURGE_STATUSES), min_length=1)
    tenant: str | None = Field(default=None, max_length=128, description="only this tenant")


class PurgePublic(BaseModel):
    deleted_jobs: int
    deleted_pages: int


class ApiKeyPublic(BaseModel):
    id: uuid.UUID
    name: str
    tenant: str
    role: KeyRole
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")
    tenant: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$"
    )
    role: KeyRole = KeyRole.user


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="the key itself: shown this once, stored only hashed")


def _key_public(row: ApiKey) -> ApiKeyPublic:
    return ApiKeyPublic(
        id=row.id,
        name=row.name,
        tenant=row.tenant,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


# --------------------------------------------------------------------------------------
# Audit


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: the admin key, its tenant, and the request that carried the action."""

    key_id: uuid.UUID | None
    tenant: str | None
    request_id: str | None

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        return cls(principal.key_id, principal.tenant, request_id_var.get())


async def _write_audit(
    session: AsyncSession,
    actor: Actor,
    action: str,
    target: str | None,
    params: dict[str, Any],
    result: dict[str, Any],
    *,
    ok: bool,
) -> None:
    await session.execute(
        insert(AdminAudit).values(
            key_id=actor.key_id,
            tenant=actor.tenant,
            action=action,
            target=target,
            params=params,
            result=result,
            ok=ok,
            request_id=actor.request_id,
        )
    )


def _log(
    actor: Actor,
    action: str,
    target: str | None,
    result: dict[str, Any],
    *,
    ok: bool,
) -> None:
    logger.log(
        logging.INFO if ok else logging.WARNING,
        "admin %s%s by key %s: %s %s",
        action,
        f" {target}" if target else "",
        actor.key_id,
        "done" if ok else "refused",
        result,
        extra={
            "admin_action": action,
            "target": target,
            "actor_key_id": str(actor.key_id) if actor.key_id else None,
            "actor_tenant": actor.tenant,
            "ok": ok,
            "result": result,
        },
    )


async def _audited(
    db: ConnectionManager,
    actor: Actor,
    action: str,
    target: str | None,
    params: dict[str, Any],
    work: Callable[[AsyncSession], Awaitable[T]],
    summary: Callable[[T], dict[str, Any]],
) -> T:
    """Run `work` and its audit row in one unit of work; log once committed."""
    try:
        async with db.session() as session:
            value = await work(session)
            result = summary(value)
            await _write_audit(session, actor, action, target, params, result, ok=True)
    except TrawlerError as error:
        # refused (4xx): nothing changed, but the attempt is on record
        await _audit_refusal(db, actor, action, target, params, error)
        raise
    except Exception:
        logger.exception("admin %s failed", action, extra={"admin_action": action})
        raise
    _log(actor, action, target, result, ok=True)
    return value


async def _audit_refusal(
    db: ConnectionManager,
    actor: Actor,
    action: str,
    target: str | None,
    params: dict[str, Any],
    error: TrawlerError,
) -> None:
    result = {"status": error.status, "detail": error.detail}
    _log(actor, action, target, result, ok=False)
    try:
        async with db.session() as session:
            await _write_audit(session, actor, action, target, params, result, ok=False)
    except Exception:
        # the caller's answer is the refusal; a failed audit write must not replace it
        logger.exception("could not write the audit row of a refused admin %s", action)


# --------------------------------------------------------------------------------------
# Workers


_WORKERS_SQL = text(
    """
SELECT w.id, w.hostname, w.pid, w.version, w.concurrency, w.in_flight, w.state,
       w.started_at, w.heartbeat_at,
       greatest(extract(epoch FROM now() - w.heartbeat_at), 0)::float8 AS heartbeat_age_s,
       coalesce(l.n, 0) AS leased
FROM workers w
LEFT JOIN (
    SELECT lease_owner, count(*) AS n FROM task_queue WHERE lease_owner IS NOT NULL
    GROUP BY lease_owner
) l ON l.lease_owner = w.id
WHERE (CAST(:all AS boolean) OR w.state <> 'stopped')
  AND (CAST(:id AS uuid) IS NULL OR w.id = CAST(:id AS uuid))
ORDER BY w.started_at DESC, w.id
LIMIT :n
"""
)


async def list_workers(
    conn: AsyncConnection,
    *,
    stale_s: float,
    include_stopped: bool,
    limit: int,
    worker_id: uuid.UUID | None = None,
) -> WorkerListPublic:
    params = {"all": include_stopped, "n": limit, "id": worker_id}
    rows = (await conn.execute(_WORKERS_SQL, params)).mappings()
    items = [
        WorkerPublic(
            **row,
            stale=row["state"] != WorkerState.stopped and row["heartbeat_age_s"] > stale_s,
        )
        for row in rows
    ]
    live = sum(1 for w in items if w.state != WorkerState.stopped and not w.stale)
    return WorkerListPublic(items=items, live=live, stale=sum(1 for w in items if w.stale))


_DRAIN_SQL = text(
    "UPDATE workers SET state = 'draining' WHERE id = :id AND state = 'running' RETURNING id"
)
_WORKER_STATE_SQL = text("SELECT state FROM workers WHERE id = :id")


async def drain_worker(
    db: ConnectionManager, actor: Actor, worker_id: uuid.UUID, *, stale_s: float
) -> WorkerPublic:
    """Ask a worker to stop claiming and exit once idle (it notices at its next heartbeat).

    Idempotent for a draining worker; 409 for a stopped one; 404 for an unknown id.
    """

    async def work(session: AsyncSession) -> WorkerPublic:
        conn = await session.connection()
        if (await conn.execute(_DRAIN_SQL, {"id": worker_id})).first() is None:
            state = (await conn.execute(_WORKER_STATE_SQL, {"id": worker_id})).scalar()
            if state is None:
                raise NotFound(f"worker {worker_id} not found")
            if state == WorkerState.stopped:
                raise Conflict(f"worker {worker_id} has stopped already")
        await conn.execute(
            text("SELECT pg_notify(:c, :id)"), {"c": NOTIFY_WORKERS, "id": str(worker_id)}
        )
        found = await list_workers(
            conn, stale_s=stale_s, include_stopped=True, limit=1, worker_id=worker_id
        )
        return found.items[0]

    return await _audited(
        db, actor, "worker.drain", str(worker_id), {}, work, lambda w: {"state": w.state.value}
    )


# --------------------------------------------------------------------------------------
# Queue figures, pause / resume, lease recovery


_QUEUE_SQL = text(
    """
SELECT priority,
       count(*) FILTER (WHERE lease_owner IS NULL) AS queued,
       count(*) FILTER (WHERE lease_owner IS NULL AND next_attempt_at <= now()) AS due,
       count(*) FILTER (WHERE lease_owner IS NOT NULL) AS leased,
       count(*) FILTER (WHERE lease_expires_at < now()) AS expired,
       extract(epoch FROM now() - min(next_attempt_at)
               FILTER (WHERE lease_owner IS NULL AND next_attempt_at <= now()))::float8
           AS oldest_s
FROM task_queue
GROUP BY priority ORDER BY priority DESC
"""
)
_PAUSED_SQL = text("SELECT paused, updated_at FROM cluster_state WHERE id = 1")
_JOBS_BY_STATUS_SQL = text("SELECT status, count(*) AS n FROM jobs GROUP BY status")


async def limit_statement_time(conn: AsyncConnection, seconds: float) -> None:
    """Make the server give up on this transaction's statements after `seconds`."""
    ms = max(1, int(seconds * 1000))
    await conn.execute(text(f"SET LOCAL statement_timeout = {ms}"))


async def queue_figures(conn: AsyncConnection) -> QueuePublic:
    """Queue depth by status and priority; reads the queue's rows (task_queue: the tasks
    queued or leased), not the finished tasks."""
    rows = (await conn.execute(_QUEUE_SQL)).mappings().all()
    paused_row = (await conn.execute(_PAUSED_SQL)).mappings().one_or_none()
    jobs_by_status = dict.fromkeys((s.value for s in JobStatus), 0)
    for status, n in (await conn.execute(_JOBS_BY_STATUS_SQL)).all():
        jobs_by_status[str(status)] = int(n)
    queued = sum(int(r["queued"]) for r in rows)
    due = sum(int(r["due"]) for r in rows)
    oldest = [float(r["oldest_s"]) for r in rows if r["oldest_s"] is not None]
    return QueuePublic(
        paused=bool(paused_row["paused"]) if paused_row else False,
        paused_changed_at=paused_row["updated_at"] if paused_row else None,
        by_status={
            "queued": queued,
            "due": due,
            "delayed": queued - due,
            "leased": sum(int(r["leased"]) for r in rows),
        },
        by_priority=[
            PriorityDepth(
                priority=r["priority"], queued=r["queued"], due=r["due"], leased=r["leased"]
            )
            for r in rows
        ],
        oldest_queued_age_s=round(max(oldest), 3) if oldest else None,
        expired_leases=sum(int(r["expired"]) for r in rows),
        jobs_by_status=jobs_by_status,
    )


_SET_PAUSED_SQL = text(
    "UPDATE cluster_state SET paused = :paused, updated_at = now() "
    "WHERE id = 1 AND paused IS DISTINCT FROM :paused RETURNING updated_at"
)


async def set_paused(db: ConnectionManager, actor: Actor, paused: bool) -> PausePublic:
    """Pause or resume claiming everywhere.

    Every claim statement reads cluster_state.paused itself, so a pause holds for every
    claim that starts after this commits (claims already running finish). Resuming also
    sends NOTIFY trawler_tasks, delivered on commit, so idle workers claim at once instead
    of at their next poll.
    """

    async def work(session: AsyncSession) -> PausePublic:
        conn = await session.connection()
        changed_at = (await conn.execute(_SET_PAUSED_SQL, {"paused": paused})).scalar()
        if changed_at is None:
            row = (await conn.execute(_PAUSED_SQL)).mappings().one_or_none()
            if row is None:  # the migration seeds this row; someone deleted it
                await conn.execute(
                    text("INSERT INTO cluster_state (id, paused) VALUES (1, :paused)"),
                    {"paused": paused},
                )
                row = (await conn.execute(_PAUSED_SQL)).mappings().one()
                changed = True
            else:
                changed = False
            since = row["updated_at"]
        else:
            changed, since = True, changed_at
        if not paused:
            await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": queue.NOTIFY_TASKS})
        return PausePublic(paused=paused, changed=changed, since=since)

    action = "queue.pause" if paused else "queue.resume"
    return await _audited(db, actor, action, None, {}, work, lambda p: {"changed": p.changed})


async def requeue_expired(
    db: ConnectionManager, actor: Actor, *, stale_s: float, batch: int
) -> RequeuePublic:
    """Give back to the queue the tasks whose lease expired or whose worker went silent
    (app.services.queue.recover_lost), in committed batches until none is left."""
    recovered = 0
    try:
        # bounded: a batch recovers up to `batch` rows; leases expiring meanwhile could keep
        # the loop going, so it stops after a fixed number of rounds
        for _ in range(1000):
            async with db.connect() as conn:
                n = await queue.recover_lost(conn, stale_s=stale_s, limit=batch)
            recovered += n
            if n < batch:
                break
    except Exception:
        logger.exception("admin tasks.requeue-expired failed after %d tasks", recovered)
        await _audit_outcome(db, actor, "tasks.requeue_expired", {"recovered": recovered}, ok=False)
        raise
    await _audit_outcome(db, actor, "tasks.requeue_expired", {"recovered": recovered}, ok=True)
    return RequeuePublic(recovered=recovered)


async def _audit_outcome(
    db: ConnectionManager,
    actor: Actor,
    action: str,
    result: dict[str, Any],
    *,
    ok: bool,
    params: dict[str, Any] | None = None,
) -> None:
    """Audit a batched action (its work committed already) in a unit of work of its own."""
    _log(actor, action, None, result, ok=ok)
    try:
        async with db.session() as session:
            await _write_audit(session, actor, action, None, params or {}, result, ok=ok)
    except Exception:
        logger.exception("could not write the audit row of admin %s", action)
        if ok:
            raise


# --------------------------------------------------------------------------------------
# Purge


_TERMINAL = sorted(s.value for s in TERMINAL_JOB_STATUSES)


async def purge_jobs(
    db: ConnectionManager, actor: Actor, request: PurgeCreate, *, batch: int
) -> PurgePublic:
    """Delete finished jobs older than `older_than_s` with their pages, tasks and events.

    Bounded committed batches: each unit of work locks up to `batch` such jobs (SKIP
    LOCKED: a job being retried or deleted by its owner right now is left for later) and
    deletes at most `batch` rows of one kind (pages, then events, then tasks) before the
    jobs themselves go; then it commits. Only jobs whose status is terminal, re-checked
    under the row lock, are touched: a queued or running job never is.
    """
    statuses = sorted(set(request.statuses) & set(_TERMINAL))
    params = request.model_dump(mode="json")
    deleted_jobs = deleted_pages = 0
    try:
        while True:
            jobs_n, pages_n, more = await _purge_batch(db, request, statuses, batch)
            deleted_jobs += jobs_n
            deleted_pages += pages_n
            if not more:
                break
    except Exception:
        logger.exception(
            "admin jobs.purge failed after deleting %d jobs, %d pages", deleted_jobs, deleted_pages
        )
        await _audit_outcome(
            db,
            actor,
            "jobs.purge",
            {"deleted_jobs": deleted_jobs, "deleted_pages": deleted_pages},
            ok=False,
            params=params,
        )
        raise
    result = PurgePublic(deleted_jobs=deleted_jobs, deleted_pages=deleted_pages)
    await _audit_outcome(db, actor, "jobs.purge", result.model_dump(), ok=True, params=params)
    return result


async def _purge_batch(
    db: ConnectionManager, request: PurgeCreate, statuses: Sequence[str], batch: int
) -> tuple[int, int, bool]:
    """One committed unit of work; returns (jobs deleted, pages deleted, more to do)."""
    async with db.session() as session:
        conn = await session.connection()
        picked = (
            select(Job.id)
            .where(
                Job.status.in_(statuses),
                Job.finished_at < text("now() - make_interval(secs => :age)"),
            )
            .order_by(Job.finished_at, Job.id)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
        if request.tenant is not None:
            picked = picked.where(Job.tenant == request.tenant)
        ids = list((await conn.execute(picked, {"age": request.older_than_s})).scalars())
        if not ids:
            return 0, 0, False
        jobs_n, pages_n, finished = await delete_jobs(conn, ids, batch, Job.status.in_(statuses))
        return jobs_n, pages_n, not finished or len(ids) >= batch


# --------------------------------------------------------------------------------------
# API keys


async def list_keys(session: AsyncSession) -> list[ApiKeyPublic]:
    return [_key_public(k) for k in await apikeys.list_keys(session)]


async def create_key(db: ConnectionManager, actor: Actor, request: ApiKeyCreate) -> ApiKeyCreated:
    async def work(session: AsyncSession) -> ApiKeyCreated:
        row, key = await apikeys.create_key(
            session, request.name, request.tenant, admin=request.role == KeyRole.admin
        )
        return ApiKeyCreated(**_key_public(row).model_dump(), key=key)

    params = request.model_dump(mode="json")
    return await _audited(
        db, actor, "api_key.create", None, params, work,
        lambda k: {"key_id": str(k.id), "tenant": k.tenant, "role": k.role.value},
    )  # fmt: skip


_ACTIVE_ADMINS_SQL = text(
    "SELECT id FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL ORDER BY id FOR UPDATE"
)


async def revoke_key(db: ConnectionManager, actor: Actor, key_id: uuid.UUID) -> ApiKeyPublic:
    """Revoke a key (requests with it get 401 from the commit on, in every process).

    Idempotent. The last admin key that is not revoked cannot be revoked (409): that would
    lock every operator out of the admin routes.
    """

    async def work(session: AsyncSession) -> ApiKeyPublic:
        # locking every active admin key serialises concurrent revocations of the last two
        admins = set((await session.execute(_ACTIVE_ADMINS_SQL)).scalars())
        if admins == {key_id}:
            raise Conflict(f"key {key_id} is the last admin key; create another one first")
        row = await apikeys.revoke_key(session, key_id)
        if row is None:
            raise NotFound(f"API key {key_id} not found")
        return _key_public(row)

    return await _audited(
        db, actor, "api_key.revoke", str(key_id), {}, work, lambda k: {"tenant": k.tenant}
    )


# --------------------------------------------------------------------------------------
# Tenant limits

# One statement admits a submission or says why not: the tenant's active jobs (counted on
# ix_jobs_tenant_active, at most :cap rows) plus the ones this process admitted and has not
# committed yet (:pending), and its rate (GCRA on its tenant_limits row, which the upsert
# locks, so concurrent submissions of one tenant in any process are admitted one after
# another against the latest `tat`). A refusal changes nothing.
_ADMIT_ACTIVE_CTE = """
active AS (
    SELECT count(*) AS n FROM (
        SELECT 1 FROM jobs
        WHERE tenant = :tenant AND status IN ('queued', 'running')
        LIMIT :cap
    ) a
)"""
_ADMIT_RATE = Statement(
    f"""
WITH {_ADMIT_ACTIVE_CTE}, admit AS (
    INSERT INTO tenant_limits AS l (tenant, tat)
    SELECT :tenant, now() + make_interval(secs => CAST(:interval AS float8)) FROM active
    WHERE active.n + CAST(:pending AS int) + CAST(:jobs AS int) <= :cap
    ON CONFLICT (tenant) DO UPDATE
        SET tat = greatest(l.tat, now()) + make_interval(secs => CAST(:interval AS float8))
        WHERE l.tat <= now() + make_interval(secs => CAST(:tau AS float8))
    RETURNING 1
)
SELECT (SELECT n FROM active) AS active, EXISTS (SELECT 1 FROM admit) AS admitted,
       (SELECT extract(epoch FROM l.tat - now())::float8
        FROM tenant_limits l WHERE l.tenant = :tenant) AS ahead_s
"""
)
_ADMIT_ACTIVE = Statement(
    f"WITH {_ADMIT_ACTIVE_CTE} SELECT n AS active, "
    "n + CAST(:pending AS int) + CAST(:jobs AS int) <= :cap AS admitted, "
    "CAST(NULL AS float8) AS ahead_s FROM active"
)
ACTIVE_RETRY_AFTER_S = 5

# Jobs this process admitted whose submission has not finished yet, by tenant. An
# admission counts them on top of the committed active jobs, so concurrent submissions of
# one tenant in this process cannot pass the cap together (nobody waits for anybody: a
# slow database makes them wait in the pool, where they get their 503). The count is
# taken before the statement's snapshot, so a job committed meanwhile is counted at
# least once. Across API processes, submissions racing each other can each pass.
_pending: dict[str, int] = {}


async def _admit(
    session: AsyncSession | asyncpg.Connection,
    settings: Settings,
    tenant: str,
    jobs: int,
    *,
    autocommit: bool,
    pending: int = 0,
) -> None:
    rate, cap = settings.tenant_submit_rate, settings.tenant_max_active_jobs
    if not cap:
        jobs = 0  # nothing to count against
    if not rate and not jobs:
        return
    # autocommit: one round trip, and the one-statement submission that follows on this
    # session still commits as it completes; otherwise the check joins (or begins) the
    # request's transaction, which then holds the tenant's row until it commits
    # (the driver connection of ConnectionManager.driver() autocommits already)
    conn: Executor = session
    if isinstance(session, AsyncSession):
        options = {"isolation_level": "AUTOCOMMIT"} if autocommit else None
        fresh = not session.in_transaction()
        conn = await session.connection(execution_options=options if fresh else None)
    # with the cap off, LIMIT 0 makes the count free and `0 + 0 + 0 <= 0` admits
    params: dict[str, Any] = {
        "tenant": tenant,
        "jobs": jobs,
        "pending": pending if jobs else 0,
        "cap": cap if jobs else 0,
    }
    tau = 0.0
    if rate:
        interval = 1.0 / rate
        tau = (settings.tenant_submit_burst - 1) * interval
        params.update(interval=interval, tau=tau)
    row = await (_ADMIT_RATE if rate else _ADMIT_ACTIVE).fetch_one(conn, params)
    assert row is not None  # one row, always
    if row["admitted"]:
        return
    active, submitting = int(row["active"]), params["pending"]
    if jobs and active + submitting + jobs > cap:
        being = f", {submitting} more being submitted" if submitting else ""
        raise TooManyRequests(
            f"the tenant is at its limit of {cap} active jobs ({active} queued or running"
            f"{being}); wait for some to finish or cancel them",
            retry_after=ACTIVE_RETRY_AFTER_S,
        )
    wait = max(0.0, float(row["ahead_s"] or 0.0) - tau)
    raise TooManyRequests(
        f"submission rate limit reached ({rate:g} per second, burst "
        f"{settings.tenant_submit_burst}); retry after the time in Retry-After",
        retry_after=math.ceil(wait) or 1,
    )


@asynccontextmanager
async def admitted(
    session: AsyncSession | asyncpg.Connection,
    settings: Settings,
    tenant: str,
    *,
    jobs: int = 1,
    autocommit: bool = False,
) -> AsyncIterator[None]:
    """Admit `jobs` new active jobs for the tenant, or raise TooManyRequests (429 +
    Retry-After). Run the submission inside the block: until it ends, the jobs count as
    the tenant's in this process. `autocommit` only for a session whose next work is one
    statement that commits by itself (jobs.submit_job); never before multi-statement work.
    On a driver connection (ConnectionManager.driver()) each statement autocommits.
    """
    if not (jobs and settings.tenant_max_active_jobs):
        await _admit(session, settings, tenant, 0, autocommit=autocommit)
        yield
        return
    before = _pending.get(tenant, 0)
    _pending[tenant] = before + jobs  # reserved before any await: seen by the next one
    try:
        await _admit(session, settings, tenant, jobs, autocommit=autocommit, pending=before)
        yield
    finally:
        left = _pending[tenant] - jobs
        if left:
            _pending[tenant] = left
        else:
            del _pending[tenant]


async def check_rate(session: AsyncSession, settings: Settings, tenant: str) -> None:
    """Count a request that creates no job (an inline preview) against the tenant's
    submission rate; TooManyRequests when over it. Autocommit: nothing else follows."""
    await _admit(session, settings, tenant, 0, autocommit=True)
