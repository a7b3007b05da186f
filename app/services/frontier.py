"""Enqueue URLs as tasks of a job: canonicalized, deduplicated by a unique index."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.scraper.urls import canonicalize_url, url_hash, url_host
from app.services.queue import NOTIFY_TASKS

# Insert what is new (ON CONFLICT on the per-job unique URL hash) and count only the rows
# really inserted into the job's counters, in one statement.
_ENQUEUE_SQL = text(
    """
WITH ins AS (
    INSERT INTO tasks (job_id, url, url_hash, host, depth, priority, max_attempts)
    SELECT :job, u.url, u.h, u.host, u.depth, :priority, :max_attempts
    FROM unnest(CAST(:urls AS text[]), CAST(:hashes AS bytea[]), CAST(:hosts AS text[]),
                CAST(:depths AS int[])) AS u(url, h, host, depth)
    ON CONFLICT (job_id, url_hash) DO NOTHING
    RETURNING 1
), host_rows AS (
    INSERT INTO hosts (host) SELECT DISTINCT host FROM unnest(CAST(:hosts AS text[])) AS h(host)
    ON CONFLICT DO NOTHING
), counted AS (
    UPDATE jobs SET total = total + (SELECT count(*) FROM ins),
                    queued = queued + (SELECT count(*) FROM ins), updated_at = now()
    WHERE id = :job
)
SELECT count(*) FROM ins
"""
)


def prepare(urls: Iterable[tuple[str, int]]) -> list[tuple[str, bytes, str, int]]:
    """Canonicalize (url, depth) pairs and drop duplicates within the batch, keeping order."""
    seen: set[bytes] = set()
    rows: list[tuple[str, bytes, str, int]] = []
    for url, depth in urls:
        canonical = canonicalize_url(url)
        digest = url_hash(canonical)
        if digest in seen:
            continue
        seen.add(digest)
        rows.append((canonical, digest, url_host(canonical), depth))
    return rows


async def enqueue(
    conn: AsyncConnection | AsyncSession,
    job_id: uuid.UUID,
    rows: Sequence[tuple[str, bytes, str, int]],
    *,
    priority: int,
    max_attempts: int,
) -> int:
    """Add tasks (from prepare()); returns how many were new. NOTIFY fires on commit."""
    if not rows:
        return 0
    inserted = (
        await conn.execute(
            _ENQUEUE_SQL,
            {
                "job": job_id,
                "urls": [r[0] for r in rows],
                "hashes": [r[1] for r in rows],
                "hosts": [r[2] for r in rows],
                "depths": [r[3] for r in rows],
                "priority": priority,
                "max_attempts": max_attempts,
            },
        )
    ).scalar_one()
    if inserted:
        await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_TASKS})
    return int(inserted)
