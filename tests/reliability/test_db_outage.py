"""Scenario 2: the database connection is cut for several seconds in the middle of a crawl.

Two `trawler worker` processes and the API reach PostgreSQL only through a TCP proxy the
test owns (tests/support/db_proxy.py); the cut drops every connection on it. The shared
PostgreSQL itself is never touched.

Promise: workers and API recover without a restart; /health reports down, then ok; no job
and no page is lost or stored twice; submissions during the outage get 503 with
Retry-After quickly (not a hang, not a 500) and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from app.services import apikeys
from tests.conftest import make_settings
from tests.integration.conftest import Headers
from tests.support.crawl_site import CrawlSite
from tests.support.db_proxy import Cut, LostReplyProxy, Proxy, proxied_url, upstream_opener
from tests.support.jobs import (
    create_job,
    job_row,
    pages_of,
    pages_stored_twice,
    scalar,
    task_counts,
    wait_terminal,
)
from tests.support.site import LocalSite
from tests.support.workers import wait_until, worker_id, worker_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CATEGORIES, ITEMS = 12, 100  # 1,215 reachable pages at depth 2
OUTAGE_S = 5.0
HEALTH_BOUND_S = 2.0  # every /health answer, database down or not
SUBMISSIONS = 4  # concurrent submissions during the outage, one API key
RECOVERY_BOUND_S = 15.0
LEASE_S = 10.0
WORKER_ENV = {
    "TRAWLER_WORKER_CONCURRENCY": "32",
    # A claim whose COMMIT answer is lost in the cut leaves its tasks leased to a worker that
    # does not know it holds them (see test_a_claim_whose_commit_answer_is_lost_...): they
    # come back when the lease runs out. A 10 s lease bounds that stall here (the default
    # 60 s would make this test take minutes whenever the cut hits a claim's COMMIT).
    "TRAWLER_LEASE_SECONDS": str(LEASE_S),
    # the production ratio: a few seconds of outage must not make live workers look dead
    "TRAWLER_WORKER_STALE_SECONDS": "30",
    "TRAWLER_DB_CONNECT_TIMEOUT": "2",
    "TRAWLER_DB_COMMAND_TIMEOUT": "5",
}


@pytest.fixture
async def proxy(pg_server: str) -> AsyncIterator[Proxy]:
    p = Proxy(upstream_opener(pg_server))
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def api_settings(db_url: str, proxy: Proxy) -> Settings:
    # production timeouts: what bounds the 503s is the real configuration
    defaults = Settings.model_fields
    return make_settings(
        proxied_url(db_url, proxy.port),
        pool_size=4,
        max_overflow=0,
        pool_timeout=defaults["pool_timeout"].default,
        db_connect_timeout=defaults["db_connect_timeout"].default,
        health_timeout=defaults["health_timeout"].default,
    )


@pytest.fixture
async def api(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(api_settings, migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


async def _timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await request
    return response, time.perf_counter() - started


async def _stored(db: ConnectionManager, job_id: uuid.UUID) -> int:
    return int(await scalar(db, "SELECT count(*) FROM pages WHERE job_id = :j", j=job_id))


async def _stored_more_than(db: ConnectionManager, job_id: uuid.UUID, n: int) -> bool:
    return await _stored(db, job_id) > n


async def _leases(db: ConnectionManager) -> list[tuple[object, ...]]:
    """Leased tasks per owner (with the owner's last heartbeat and the soonest expiry)."""
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT q.lease_owner, count(*), round(extract(epoch FROM "
                "min(q.lease_expires_at) - now())::numeric, 1) AS expires_in, "
                "round(extract(epoch FROM now() - max(w.heartbeat_at))::numeric, 1) AS beat_ago "
                "FROM task_queue q LEFT JOIN workers w ON w.id = q.lease_owner "
                "WHERE q.lease_owner IS NOT NULL GROUP BY q.lease_owner"
            )
        )
        return [tuple(r) for r in rows]


@pytest.mark.parametrize("cut", ["refuse", "blackhole"])
async def test_crawl_survives_a_database_outage(
    db_url: str,
    db: ConnectionManager,
    proxy: Proxy,
    api: httpx.AsyncClient,
    api_settings: Settings,
    headers: Headers,
    cut: Cut,
) -> None:
    via_proxy = proxied_url(db_url, proxy.port)
    async with CrawlSite(categories=CATEGORIES, items=ITEMS).serve() as site:
        expected = site.expected_pages(2)
        crawl = await api.post(
            "/api/v1/crawl",
            headers=headers,
            json={
                "seeds": [site.url("/")],
                "follow": {"max_depth": 2, "max_pages": 10_000},
                "politeness": {"per_host_concurrency": 64},
            },
        )
        assert crawl.status_code == 202, crawl.text
        job_id = uuid.UUID(crawl.json()["id"])
        accepted = {job_id}
        async with (
            worker_process(via_proxy, **WORKER_ENV) as one,
            worker_process(via_proxy, **WORKER_ENV) as two,
        ):
            ids = {await worker_id(db, one.pid), await worker_id(db, two.pid)}
            await wait_until(
                lambda: _stored_more_than(db, job_id, len(expected) // 4),
                60,
                "a quarter of the crawl stored",
                interval=0.05,
            )

            # ---------------------------------------------------------------- the outage
            await proxy.cut(cut)
            cut_at = time.monotonic()
            await asyncio.sleep(0.3)  # a commit already on the wire may still land
            stored_at_cut = await _stored(db, job_id)

            health, health_s = await _timed(api.get("/health"))
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "down"
            assert health_s < HEALTH_BOUND_S, f"/health took {health_s:.2f}s"

            # submissions: 503 + Retry-After, never a 500 and never a hang. The key's cache
            # entry has expired by now, as it would have for a client arriving mid-outage.
            # Refused connections fail at once; black-holed ones wait out the connect
            # timeout, after at most a pool timeout in line for a connection slot.
            bound = 1.0 + (
                0.0
                if cut == "refuse"
                else api_settings.pool_timeout + api_settings.db_connect_timeout
            )
            await asyncio.sleep(max(0.0, apikeys.CACHE_TTL_S + 0.1 - (time.monotonic() - cut_at)))
            submissions = await asyncio.gather(
                *(
                    _timed(
                        api.post(
                            "/api/v1/scrape",
                            headers=headers,
                            json={"urls": [site.url(f"/item/0-{n}?during-outage")]},
                        )
                    )
                    for n in range(SUBMISSIONS)
                )
            )
            for response, took in submissions:
                assert response.status_code == 503, response.text
                assert response.headers["content-type"].startswith("application/problem+json")
                assert int(response.headers["Retry-After"]) >= 1
                assert took < bound, f"a submission took {took:.2f}s during the outage"
            submit_s = sorted(took for _, took in submissions)

            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
            assert await _stored(db, job_id) == stored_at_cut, "the cut did not cut"
            assert one.returncode is None and two.returncode is None, "a worker died"
            await proxy.restore()
            outage = time.monotonic() - cut_at

            # ---------------------------------------------------------------- recovery
            async def ready() -> bool:
                return (await api.get("/health/ready")).status_code == 200

            ready_s = await wait_until(ready, RECOVERY_BOUND_S, "/health/ready after restore")
            health = await api.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok", health.text
            after = await api.post(
                "/api/v1/scrape", headers=headers, json={"urls": [site.url("/after-the-outage")]}
            )
            assert after.status_code == 202, after.text
            accepted.add(uuid.UUID(after.json()["id"]))

            async def progressing() -> bool:
                return await _stored(db, job_id) > stored_at_cut

            try:
                resumed_s = await wait_until(
                    progressing, LEASE_S + RECOVERY_BOUND_S, "workers storing again"
                )
            except AssertionError as stalled:
                raise AssertionError(
                    f"{stalled}; leases now: {await _leases(db)}; worker logs:\n"
                    f"{one.log(1500)}\n---\n{two.log(1500)}"
                ) from None
            rows = [await wait_terminal(db, j, timeout=90) for j in sorted(accepted)]
            done_s = time.monotonic() - cut_at - outage
            for worker in (one, two):
                assert worker.returncode is None, f"worker restarted or died:\n{worker.log()}"
                worker.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(worker.wait(), 30) == 0, worker.log()

    assert all(r["status"] == "completed" for r in rows), rows
    # no job lost, and none created behind a 503
    jobs = await scalar(db, "SELECT count(*) FROM jobs")
    assert jobs == len(accepted) == 2
    pages = await pages_of(db, job_id)
    assert {p["url"] for p in pages} == expected
    assert await pages_stored_twice(db, job_id) == {}
    assert len(pages) == len(expected)
    assert all(p["ok"] for p in pages), [p["error"] for p in pages if not p["ok"]][:5]
    counts = await task_counts(db, job_id)
    assert counts == {"succeeded": len(expected), "skipped": 1}, counts
    leased = await scalar(db, "SELECT count(*) FROM task_queue WHERE lease_owner IS NOT NULL")
    assert leased == 0
    registered = await scalar(db, "SELECT count(*) FROM workers")
    assert registered == len(ids) == 2, "a worker re-registered: it was restarted"
    # fetched once: no live worker's lease ran out (the cut is shorter than the lease) and
    # none looked dead; tasks of a lost claim answer were not fetched before their lease ended
    page_hits = {path: n for path, n in site.hits.items() if path != "/robots.txt"}
    refetched = sum(1 for n in page_hits.values() if n > 1)
    assert refetched == 0, sorted(p for p, n in page_hits.items() if n > 1)
    print(
        f"\n[outage {cut}] {len(expected)} pages; cut at {stored_at_cut} stored for "
        f"{outage:.1f}s; /health down in {health_s * 1000:.0f} ms; {SUBMISSIONS} submissions "
        f"503 in {', '.join(f'{t:.2f}' for t in submit_s)} s; ready {ready_s:.1f}s after restore, "
        f"storing again after {resumed_s:.1f}s, all jobs done {done_s:.1f}s after restore; "
        f"stored twice 0, fetched twice {refetched}"
    )


async def test_submissions_fail_fast_when_the_database_is_black_holed(
    db_url: str, proxy: Proxy, headers: Headers
) -> None:
    """N concurrent requests with one key during a black-hole outage: every one gets its 503
    within pool_timeout + db_connect_timeout, however many there are."""
    settings = make_settings(
        proxied_url(db_url, proxy.port),
        pool_size=4,
        max_overflow=0,
        pool_timeout=2.0,
        db_connect_timeout=1.0,
    )
    bound = settings.pool_timeout + settings.db_connect_timeout + 0.5
    application = create_app(settings, migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as api:
            warm = await api.post(
                "/api/v1/scrape", headers=headers, json={"urls": ["http://example.com/warm"]}
            )
            assert warm.status_code == 202, warm.text
            await proxy.cut("blackhole")
            await asyncio.sleep(apikeys.CACHE_TTL_S + 0.1)  # the key's cache entry expired
            answers = await asyncio.gather(
                *(
                    _timed(
                        api.post(
                            "/api/v1/scrape",
                            headers=headers,
                            json={"urls": [f"http://example.com/{n}"]},
                        )
                    )
                    for n in range(8)
                )
            )
            await proxy.restore()
    took = sorted(t for _, t in answers)
    print(f"\n[black hole, 8 concurrent submissions] answered in {took}")
    assert all(r.status_code == 503 and r.headers["Retry-After"] for r, _ in answers)
    assert took[-1] < bound, f"answers took {[round(t, 1) for t in took]} s; bound {bound} s"


# the claim: the one statement that sets tasks to 'leased' (a function call, committed
# on its own)
CLAIM_MARKER = rb"trawler_claim\("


async def test_a_claim_whose_commit_answer_is_lost_does_not_stall_its_job(
    pg_server: str, db_url: str, db: ConnectionManager
) -> None:
    lease_s = 2.0
    trap = LostReplyProxy(upstream_opener(pg_server), CLAIM_MARKER)
    await trap.start()
    try:
        async with LocalSite().serve() as site:
            site.delay = 1.0
            # a long job keeps the worker busy (8 fetches of 1 s at a time for ~20 s)
            busy = await create_job(
                db, [site.url(f"/page/{n}") for n in range(1000, 1160)], options={"timeout_s": 5}
            )
            async with worker_process(
                proxied_url(db_url, trap.port),
                TRAWLER_LEASE_SECONDS=str(lease_s),
                TRAWLER_WORKER_CONCURRENCY="8",
            ) as worker:
                await wait_until(lambda: _running(db, busy), 30, "the busy job running")
                urls = [site.url(f"/page/{n}") for n in range(20)]
                trap.armed = True
                job_id = await create_job(db, urls, options={"timeout_s": 5})
                async with db.connect() as conn:  # claimed before the busy job's rest
                    await conn.execute(
                        text("UPDATE task_queue SET priority = 10 WHERE job_id = :j"),
                        {"j": job_id},
                    )
                await asyncio.wait_for(trap.tripped.wait(), 30)
                orphaned = await scalar(
                    db,
                    "SELECT count(*) FROM task_queue WHERE job_id = :j AND lease_owner IS NOT NULL",
                    j=job_id,
                )
                try:
                    # without the bug: the orphaned leases expire after lease_s, are requeued
                    # by recover_lost (every 3 heartbeats) and fetched: well within 4 x lease_s
                    row = await wait_terminal(db, job_id, timeout=4 * lease_s + 3)
                finally:
                    renewed = await scalar(
                        db,
                        "SELECT count(*) FROM task_queue WHERE job_id = :j "
                        "AND lease_owner IS NOT NULL AND lease_expires_at > now()",
                        j=job_id,
                    )
                    busy_row = await job_row(db, busy)
                    print(
                        f"\n[lost claim answer] the claim's answer was lost ({orphaned} tasks "
                        f"of the job leased just after); {4 * lease_s + 3:g}s later (lease_seconds "
                        f"{lease_s:g}) {renewed} are still leased with an unexpired lease, "
                        f"never fetched: {[site.hits[f'/page/{n}'] for n in range(20)]}; the "
                        f"busy job meanwhile {busy_row['status']}, {busy_row['succeeded']} "
                        f"done; worker alive: {worker.returncode is None}"
                    )
        assert orphaned > 0, "the lost answer orphaned nothing: nothing tested"
        assert row["status"] == "completed"
        assert row["succeeded"] == len(urls)
    finally:
        await trap.close()


async def _running(db: ConnectionManager, job_id: uuid.UUID) -> bool:
    return (await job_row(db, job_id))["status"] == "running"
