"""robots.txt per host: fetched once cluster-wide, cached in `hosts` with a TTL and in memory."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import orjson
from sqlalchemy import text

from app.database.connection import ConnectionManager
from app.scraper.fetch import Fetcher
from app.scraper.robots import RobotsPolicy, robots_url

logger = logging.getLogger(__name__)

_READ_SQL = text(
    "SELECT robots, extract(epoch FROM robots_expires_at) FROM hosts WHERE host = :host"
)
# The claim spaces fetch starts by the larger of the job's delay and the Crawl-delay.
_STORE_SQL = text(
    """
INSERT INTO hosts (host, robots, robots_expires_at, robots_delay_ms)
VALUES (:host, CAST(:robots AS jsonb), to_timestamp(:expires), :delay_ms)
ON CONFLICT (host) DO UPDATE SET
    robots = EXCLUDED.robots, robots_expires_at = EXCLUDED.robots_expires_at,
    robots_delay_ms = EXCLUDED.robots_delay_ms, updated_at = now()
"""
)


class RobotsCache:
    """Per worker: memory first, then the `hosts` row, then one fetch for the cluster.

    Only one worker fetches a host's robots.txt at a time (a transaction-scoped advisory
    lock on the host); the others wait for its row instead of fetching it again.
    """

    def __init__(self, db: ConnectionManager, fetcher: Fetcher, user_agent: str) -> None:
        self.db = db
        self.fetcher = fetcher
        self.user_agent = user_agent
        self._memory: dict[str, RobotsPolicy] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def policy(self, url: str) -> RobotsPolicy:
        parts = urlsplit(url)
        host = parts.netloc.lower()
        cached = self._memory.get(host)
        if cached is not None and not cached.expired():
            return cached
        lock = self._locks.setdefault(host, asyncio.Lock())
        async with lock:
            cached = self._memory.get(host)
            if cached is not None and not cached.expired():
                return cached
            policy = await self._load_or_fetch(host, url)
            self._memory[host] = policy
            return policy

    async def _read(self, host: str) -> RobotsPolicy | None:
        async with self.db.connect() as conn:
            row = (await conn.execute(_READ_SQL, {"host": host})).first()
        if row is None or row[0] is None or row[1] is None or float(row[1]) <= time.time():
            return None
        return RobotsPolicy.from_json(row[0])

    async def _load_or_fetch(self, host: str, url: str) -> RobotsPolicy:
        stored = await self._read(host)
        if stored is not None:
            return stored
        for _ in range(100):
            async with self.db.connect() as conn:
                got = (
                    await conn.execute(
                        text("SELECT pg_try_advisory_xact_lock(hashtext(:k))"),
                        {"k": f"robots:{host}"},
                    )
                ).scalar_one()
                if got:
                    # re-check under the lock: another worker may have just stored it
                    row = (await conn.execute(_READ_SQL, {"host": host})).first()
                    if row and row[0] is not None and row[1] and float(row[1]) > time.time():
                        return RobotsPolicy.from_json(row[0])
                    policy = await self._fetch(url)
                    delay = policy.crawl_delay(self.user_agent) or 0.0
                    await conn.execute(
                        _STORE_SQL,
                        {
                            "host": host,
                            "robots": orjson.dumps(policy.to_json()).decode(),
                            "expires": policy.expires_at,
                            "delay_ms": int(delay * 1000),
                        },
                    )
                    return policy
            # someone else is fetching it: wait for their row
            await asyncio.sleep(0.2)
            stored = await self._read(host)
            if stored is not None:
                return stored
        logger.warning("robots.txt for %s still being fetched elsewhere; fetching here", host)
        return await self._fetch(url)

    async def _fetch(self, url: str) -> RobotsPolicy:
        result = await self.fetcher.fetch(robots_url(url), timeout_s=10, want_bytes=True)
        return RobotsPolicy.from_response(
            result.status_code,
            result.body if result.body is not None else result.text,
            result.error_kind if result.error_kind != "http" else None,
        )
