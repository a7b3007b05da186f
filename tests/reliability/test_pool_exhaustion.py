"""Scenario 4: a pool of 2 connections and 64 concurrent slow requests.

The requests are real submissions (POST /api/v1/scrape), made slow by the database: the
test holds a lock on the jobs table, so the first two block inside their INSERT with both
pooled connections checked out.

Promise: the excess get 503 with Retry-After within the pool timeout (not a hang, not a
500); the service recovers at once when the database speeds up again; every 202 is a job.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from tests import pg
from tests.conftest import make_settings
from tests.integration.conftest import Headers, bearer, make_key
from tests.support.jobs import scalar

pytestmark = pytest.mark.timeout(60)

CLIENTS = 64
HOLD_S = 2.5  # how long the database stays slow (longer than the pool timeout)


@pytest.fixture
def small_pool(db_url: str) -> Settings:
    return make_settings(db_url, pool_size=2, max_overflow=0, pool_timeout=1.0)


@pytest.fixture
async def small_app(small_pool: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(small_pool, migrate=False)
    async with application.router.lifespan_context(application):
        yield application


async def _submit(api: httpx.AsyncClient, key: Headers, n: int) -> tuple[int, float, str]:
    started = time.perf_counter()
    response = await api.post(
        "/api/v1/scrape", headers=key, json={"urls": [f"http://example.com/p/{n}"]}
    )
    took = time.perf_counter() - started
    if response.status_code == 503:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert int(response.headers["Retry-After"]) >= 1
    return response.status_code, took, response.text


@dataclass
class Burst:
    results: list[tuple[int, float, str]]
    answered_while_slow: int  # requests answered before the database sped up again
    first_after: tuple[int, float, str]  # a request sent as soon as it did
    first_after_s: float
    recovery: list[tuple[int, float, str]]  # 16 concurrent requests after that
    pool_during: dict[str, Any]
    pool_after: dict[str, Any]


async def _slow_burst(db_url: str, application: FastAPI, keys: list[Headers]) -> Burst:
    """CLIENTS concurrent submissions (client n uses keys[n % len(keys)]) while a lock on
    the jobs table holds every INSERT for HOLD_S seconds; then a request and a burst more."""
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as api:
        # each key verified and cached, as for clients already at work
        warm = await asyncio.gather(*(api.get("/api/v1/jobs?limit=1", headers=k) for k in keys))
        assert all(r.status_code == 200 for r in warm), [r.text for r in warm][:3]
        blocker = await asyncpg.connect(pg.asyncpg_dsn(db_url))
        try:
            locked = blocker.transaction()
            await locked.start()
            await blocker.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")  # INSERTs wait
            burst = [
                asyncio.create_task(_submit(api, keys[n % len(keys)], n)) for n in range(CLIENTS)
            ]
            done, _ = await asyncio.wait(burst, timeout=HOLD_S)
            live = await api.get("/health/live")  # needs no connection: answers anyway
            assert live.status_code == 200
            await locked.rollback()  # the database is fast again
            released = time.perf_counter()
        finally:
            await blocker.close()
        first_after = await _submit(api, keys[0], 10_000)
        first_after_s = time.perf_counter() - released
        results = await asyncio.gather(*burst)
        pool_during = application.state.db.pool_status()
        recovery = await asyncio.gather(
            *(_submit(api, keys[n % len(keys)], 20_000 + n) for n in range(16))
        )
        await application.state.task_waker.settle()  # the wake-up after the last commit
        pool_after = application.state.db.pool_status()
    return Burst(results, len(done), first_after, first_after_s, recovery, pool_during, pool_after)


async def test_pool_of_two_under_64_slow_requests(
    db_url: str, db: ConnectionManager, small_app: FastAPI, small_pool: Settings
) -> None:
    """64 clients (one API key each, as 64 tenants) at once against a pool of 2."""
    keys = [bearer(await make_key(db, f"tenant-{n}")) for n in range(CLIENTS)]
    burst = await _slow_burst(db_url, small_app, keys)

    statuses = Counter(status for status, _, _ in burst.results)
    refused = [took for status, took, _ in burst.results if status == 503]
    unexpected = [text for s, _, text in burst.results if s not in (202, 503)]
    assert not unexpected, unexpected
    assert statuses[202] == 2, statuses  # the two holding the connections, once unblocked
    assert burst.answered_while_slow == statuses[503] == CLIENTS - 2
    bound = small_pool.pool_timeout + 0.5
    assert max(refused) < bound, f"a 503 took {max(refused):.2f}s (pool timeout 1 s)"
    # (a background re-verification of a key about to expire may time out in line too)
    assert burst.pool_during["timeouts"] >= statuses[503]
    # recovery: the next request and a burst of 16 all succeed at once
    assert burst.first_after[0] == 202, burst.first_after
    assert burst.first_after_s < 0.5, f"first request after took {burst.first_after_s:.2f}s"
    assert all(status == 202 for status, _, _ in burst.recovery), burst.recovery
    slowest_recovery = max(took for _, took, _ in burst.recovery)
    assert slowest_recovery < small_pool.pool_timeout
    assert burst.pool_after["checked_out"] == 0
    assert burst.pool_after["timeouts"] == burst.pool_during["timeouts"]
    # every 202 is a committed job; the 503s left nothing behind
    jobs = await scalar(db, "SELECT count(*) FROM jobs")
    assert jobs == statuses[202] + 1 + len(burst.recovery)
    print(
        f"\n[pool exhaustion] pool 2, {CLIENTS} concurrent slow submissions: "
        f"{statuses[503]} x 503 in {min(refused):.2f}-{max(refused):.2f}s "
        f"(pool timeout {small_pool.pool_timeout:g}s), {statuses[202]} x 202 once the database "
        f"sped up; first request after {burst.first_after_s * 1000:.0f} ms; 16 concurrent "
        f"then all 202, slowest {slowest_recovery * 1000:.0f} ms; jobs in DB = 202s"
    )


async def test_one_tenant_under_64_slow_requests(
    db_url: str, db: ConnectionManager, small_app: FastAPI, small_pool: Settings
) -> None:
    """The same burst from 64 clients sharing one API key: the excess must still get 503
    within the pool timeout rather than wait for the database."""
    key = bearer(await make_key(db, "one-tenant"))
    burst = await _slow_burst(db_url, small_app, [key])
    statuses = Counter(status for status, _, _ in burst.results)
    slowest = max(took for _, took, _ in burst.results)
    print(
        f"\n[pool exhaustion, one tenant] {dict(statuses)}; answered while the database was "
        f"slow: {burst.answered_while_slow}; slowest answer {slowest:.2f}s"
    )
    assert set(statuses) <= {202, 503}, statuses
    assert burst.answered_while_slow >= CLIENTS - 2, "requests waited for the slow database"
    refused = [took for status, took, _ in burst.results if status == 503]
    assert max(refused) < small_pool.pool_timeout + 0.5
