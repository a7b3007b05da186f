"""Health probes: liveness (no DB), readiness (DB + migrations at head), details.

Every probe runs through ConnectionManager.bounded(), so each answer comes within
`health_timeout` seconds even when the database refuses, black-holes or freezes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.api.deps import DbDep
from app.database.connection import ConnectionManager, DatabaseUnavailable
from app.database.migrations import head_revision

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

_SERVER_SQL = text(
    "SELECT current_setting('server_version') AS version,"
    " to_regclass('alembic_version') IS NOT NULL AS migrated"
)
_REVISION_SQL = text("SELECT version_num FROM alembic_version LIMIT 1")

# Counts use the partial indexes of task_queue (waiting / leased rows); statement_timeout
# makes the server give up too, so a huge queue cannot pile up slow counts behind the
# probes.
_QUEUE_SQL = text(
    """
    SELECT
      (SELECT count(*) FROM task_queue WHERE lease_owner IS NULL) AS queued,
      (SELECT count(*) FROM task_queue WHERE lease_owner IS NOT NULL) AS leased,
      coalesce((SELECT paused FROM cluster_state WHERE id = 1), false) AS paused,
      (SELECT count(*) FROM workers
        WHERE state <> 'stopped' AND heartbeat_at > now() - make_interval(secs => :stale))
        AS live,
      (SELECT count(*) FROM workers
        WHERE state <> 'stopped' AND heartbeat_at <= now() - make_interval(secs => :stale))
        AS stale
    """
)


async def _server_state(conn: AsyncConnection) -> dict[str, Any]:
    row = (await conn.execute(_SERVER_SQL)).mappings().one()
    revision = (await conn.execute(_REVISION_SQL)).scalar() if row["migrated"] else None
    return {"server_version": str(row["version"]), "revision": revision}


async def _probe(db: ConnectionManager) -> dict[str, Any]:
    """Round trip + schema revision. Raises DatabaseUnavailable (in time) or propagates bugs."""
    started = time.perf_counter()
    info = await db.bounded("health-ready", _server_state, limit=db.settings.health_timeout)
    info["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return info


async def _queue(db: ConnectionManager, limit: float) -> dict[str, Any]:
    stale = db.settings.worker_stale_seconds

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        ms = max(1, int(limit * 1000))
        await conn.execute(text(f"SET LOCAL statement_timeout = {ms}"))
        row = (await conn.execute(_QUEUE_SQL, {"stale": stale})).mappings().one()
        return {
            "queue": {"queued": row["queued"], "leased": row["leased"], "paused": row["paused"]},
            "workers": {"live": row["live"], "stale": row["stale"]},
        }

    return await db.bounded("health-queue", work, limit=limit)


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
        current = info["revision"] or "an empty schema"
        return _unready(f"schema at {current}, code expects {head}; run `trawler migrate`")
    return JSONResponse({"status": "ready", "revision": head})


def _unready(reason: str) -> JSONResponse:
    return JSONResponse(
        {"status": "unavailable", "reason": reason},
        status_code=503,
        headers={"Retry-After": "2"},
    )


@router.get("/health")
async def health(db: DbDep) -> JSONResponse:
    deadline = time.perf_counter() + db.settings.health_timeout
    pool = db.pool_status()
    head = head_revision()
    body: dict[str, Any] = {"pool": pool, "migrations": {"head": head}}
    try:
        info = await _probe(db)
    except DatabaseUnavailable as error:
        body.update(status="down", database={"ok": False, "error": str(error)})
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    problems: list[str] = []
    if info["revision"] != head:
        problems.append("migrations pending")
    if pool["checked_out"] >= pool["size"] + pool["max_overflow"]:
        problems.append("connection pool exhausted")
    figures: dict[str, Any] = {"queue": None, "workers": None}
    remaining = deadline - time.perf_counter()
    if info["revision"] is None:
        pass  # no tables yet: nothing to count
    elif remaining <= 0.05:
        problems.append("no time left to count the queue")
    else:
        try:
            figures = await _queue(db, remaining)
        except DatabaseUnavailable as error:
            # the database answered the probe: a slow count degrades, it does not mean down
            problems.append(f"queue figures unavailable ({error})")
        except Exception:
            logger.exception("queue figures for /health failed")
            problems.append("queue figures unavailable (internal error)")
    queue, workers = figures["queue"], figures["workers"]
    if queue and workers and queue["queued"] and not workers["live"]:
        problems.append("tasks queued but no live worker")
    if queue and queue["paused"]:
        problems.append("claiming is paused (POST /api/v1/admin/queue/resume)")
    body.update(
        status="degraded" if problems else "ok",
        problems=problems,
        database={
            "ok": True,
            "latency_ms": info["latency_ms"],
            "server_version": info["server_version"],
        },
        queue=queue,
        workers=workers,
    )
    body["migrations"]["current"] = info["revision"]
    return JSONResponse(body)
