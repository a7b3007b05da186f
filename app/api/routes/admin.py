"""Admin routes (admin keys only, else 403): workers, queue, pause/resume, lease recovery,
purge, pool, API keys. Every action that changes something is audited (admin_audit + log)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, status

from app.api.deps import AdminDep, DbDep, SessionDep, SettingsDep
from app.api.routes.common import API_PREFIX
from app.services import admin
from app.services.admin import (
    Actor,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    PausePublic,
    PurgeCreate,
    PurgePublic,
    QueuePublic,
    RequeuePublic,
    WorkerListPublic,
    WorkerPublic,
)

router = APIRouter(prefix=f"{API_PREFIX}/admin", tags=["admin"])


@router.get("/workers", response_model=WorkerListPublic)
async def list_workers(
    session: SessionDep,
    _admin: AdminDep,
    settings: SettingsDep,
    include_stopped: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> WorkerListPublic:
    """Registered workers, newest first: host, pid, concurrency, in flight, heartbeat age."""
    conn = await session.connection()
    return await admin.list_workers(
        conn,
        stale_s=settings.worker_stale_seconds,
        include_stopped=include_stopped,
        limit=limit,
    )


@router.post("/workers/{worker_id}/drain", response_model=WorkerPublic)
async def drain_worker(
    worker_id: uuid.UUID, db: DbDep, principal: AdminDep, settings: SettingsDep
) -> WorkerPublic:
    """The worker stops claiming (at its next heartbeat) and exits once its work is stored."""
    return await admin.drain_worker(
        db, Actor.of(principal), worker_id, stale_s=settings.worker_stale_seconds
    )


@router.get("/queue", response_model=QueuePublic)
async def queue_depth(session: SessionDep, _admin: AdminDep, settings: SettingsDep) -> QueuePublic:
    """Queued and leased tasks by priority, the oldest due task's wait, jobs by status."""
    conn = await session.connection()
    await admin.limit_statement_time(conn, settings.admin_query_timeout)
    return await admin.queue_figures(conn)


@router.post("/queue/pause", response_model=PausePublic)
async def pause(db: DbDep, principal: AdminDep) -> PausePublic:
    """Stop claiming cluster-wide; leased work finishes. Idempotent."""
    return await admin.set_paused(db, Actor.of(principal), True)


@router.post("/queue/resume", response_model=PausePublic)
async def resume(db: DbDep, principal: AdminDep) -> PausePublic:
    """Claim again (idle workers are woken at once). Idempotent."""
    return await admin.set_paused(db, Actor.of(principal), False)


@router.post("/tasks/requeue-expired", response_model=RequeuePublic)
async def requeue_expired(db: DbDep, principal: AdminDep, settings: SettingsDep) -> RequeuePublic:
    """Requeue tasks whose lease expired or whose worker went silent (attempts left),
    fail those out of attempts."""
    return await admin.requeue_expired(
        db,
        Actor.of(principal),
        stale_s=settings.worker_stale_seconds,
        batch=settings.purge_batch_size,
    )


@router.post("/jobs/purge", response_model=PurgePublic)
async def purge_jobs(
    body: PurgeCreate, db: DbDep, principal: AdminDep, settings: SettingsDep
) -> PurgePublic:
    """Delete finished jobs older than older_than_s, with their pages, in committed batches."""
    return await admin.purge_jobs(db, Actor.of(principal), body, batch=settings.purge_batch_size)


@router.get("/pool")
async def pool(db: DbDep, _admin: AdminDep) -> dict[str, Any]:
    """This API process's connection pool: sizes, counters since start, checkout waits."""
    return {"application_name": db.application_name, **db.pool_status()}


@router.get("/api-keys", response_model=list[ApiKeyPublic])
async def list_api_keys(session: SessionDep, _admin: AdminDep) -> list[ApiKeyPublic]:
    """Every key (never its secret), oldest first."""
    return await admin.list_keys(session)


@router.post("/api-keys", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED)
async def create_api_key(body: ApiKeyCreate, db: DbDep, principal: AdminDep) -> ApiKeyCreated:
    """A new key, shown once in `key`; tenant defaults to the name."""
    return await admin.create_key(db, Actor.of(principal), body)


@router.delete("/api-keys/{key_id}", response_model=ApiKeyPublic)
async def revoke_api_key(key_id: uuid.UUID, db: DbDep, principal: AdminDep) -> ApiKeyPublic:
    """Revoke a key: refused (401) from the commit on, in every API process."""
    return await admin.revoke_key(db, Actor.of(principal), key_id)
