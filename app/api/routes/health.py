"""Health probes: liveness (no DB), readiness (DB + migrations at head), details."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import DbDep
from app.database.connection import ConnectionManager, DatabaseUnavailable
from app.database.migrations import head_revision

router = APIRouter(tags=["health"])

_QUEUE_SQL = text(
    """
    SELECT
      (SELECT count(*) FROM tasks WHERE status = 'queued') AS queued,
      (SELECT count(*) FROM tasks WHERE status = 'leased') AS leased,
      (SELECT count(*) FROM workers
        WHERE state <> 'stopped' AND heartbeat_at > now() - make_interval(secs => :stale))
        AS live,
      (SELECT count(*) FROM workers
        WHERE state <> 'stopped' AND heartbeat_at <= now() - make_interval(secs => :stale))
        AS stale,
      (SELECT version_num FROM alembic_version LIMIT 1) AS revision
    """
)


async def _probe(db: ConnectionManager) -> dict[str, Any]:
    """DB round trip + schema revision + queue figures, all inside one hard time limit."""
    timeout = db.settings.health_timeout
    try:
        async with asyncio.timeout(timeout):
            info = await db.health_check(limit=timeout)
            async with db.engine.connect() as conn:
                stale = db.settings.heartbeat_seconds * 3
                row = (await conn.execute(_QUEUE_SQL, {"stale": stale})).mappings().one()
    except TimeoutError as error:
        raise DatabaseUnavailable(f"database did not answer within {timeout:g}s") from error
    except DatabaseUnavailable:
        raise
    except Exception as error:
        # an unreachable or half-migrated database: report it, the probe must not 500
        raise DatabaseUnavailable(f"database check failed: {type(error).__name__}") from error
    info["revision"] = row["revision"]
    info["queue"] = {"queued": row["queued"], "leased": row["leased"]}
    info["workers"] = {"live": row["live"], "stale": row["stale"]}
    return info


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(db: DbDep) -> JSONResponse:
    head = head_revision()
    try:
        info = await _probe(db)
    except DatabaseUnavailable as error:
        return _unready(str(error))
    if info["revision"] != head:
        return _unready(f"schema at {info['revision']}, code expects {head}; run `trawler migrate`")
    return JSONResponse({"status": "ready", "revision": head})


def _unready(reason: str) -> JSONResponse:
    return JSONResponse(
        {"status": "unavailable", "reason": reason},
        status_code=503,
        headers={"Retry-After": "2"},
    )


@router.get("/health")
async def health(db: DbDep) -> JSONResponse:
    pool = db.pool_status()
    body: dict[str, Any] = {"pool": pool, "migrations": {"head": head_revision()}}
    try:
        info = await _probe(db)
    except DatabaseUnavailable as error:
        body.update(status="down", database={"ok": False, "error": str(error)})
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    status = "ok"
    problems: list[str] = []
    if info["revision"] != head_revision():
        problems.append("migrations pending")
    if pool["checked_out"] >= pool["size"] + pool["max_overflow"]:
        problems.append("connection pool exhausted")
    if info["queue"]["queued"] and not info["workers"]["live"]:
        problems.append("tasks queued but no live worker")
    if problems:
        status = "degraded"
    body.update(
        status=status,
        problems=problems,
        database={
            "ok": True,
            "latency_ms": info["latency_ms"],
            "server_version": info["server_version"],
        },
        queue=info["queue"],
        workers=info["workers"],
    )
    body["migrations"]["current"] = info["revision"]
    return JSONResponse(body)
