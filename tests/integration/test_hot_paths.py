"""The API's hot paths: GET /jobs/{id} without a session; API keys verified once for all
concurrent cache misses and re-verified ahead of expiry; submissions that do not queue
behind each other."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import Request
from sqlalchemy import text

from app.api.deps import Credentials, get_principal
from app.api.schemas import CrawlCreate, ScrapeCreate
from app.database.connection import ConnectionManager
from app.services import apikeys, jobs
from tests.integration.conftest import Count, Headers, SqlRun

JOBS = "/api/v1/jobs"


async def _submit(client: httpx.AsyncClient, headers: Headers, url: str) -> str:
    response = await client.post(
        "/api/v1/scrape",
        json={"urls": [url], "extract": {"title": {"css": "h1"}}, "priority": 3},
        headers=headers,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def test_get_job_sends_exactly_the_model_json(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager, sql: SqlRun
) -> None:
    """The row serialised directly is byte for byte what JobPublic would have produced."""
    fresh = await _submit(client, auth_headers, "http://example.com/fresh")
    done = await _submit(client, auth_headers, "http://example.com/done")
    await sql(
        "UPDATE jobs SET status = 'failed', started_at = now() - interval '2 s', "
        "finished_at = now(), error = 'every page failed: \"HTTP 503\" ✓', queued = 0, "
        "failed = 1 WHERE id = :id",
        id=uuid.UUID(done),
    )
    for job_id in (fresh, done):
        response = await client.get(f"{JOBS}/{job_id}", headers=auth_headers)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        async with db.session() as session:
            model = await jobs.get_job(session, "tenant-a", uuid.UUID(job_id))
        assert model is not None
        assert response.content == model.model_dump_json().encode()


async def test_get_job_opens_no_session(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager, app: Any
) -> None:
    job_id = await _submit(client, auth_headers, "http://example.com/one")
    await app.state.task_waker.settle()  # the submission's NOTIFY has its own checkout
    pool = app.state.db  # the app's own manager, not the test's
    before = pool.pool_status()["checkouts"]
    response = await client.get(f"{JOBS}/{job_id}", headers=auth_headers)
    assert response.status_code == 200
    # the key is cached from the submission: one checkout, the read's own
    assert pool.pool_status()["checkouts"] - before == 1


async def test_get_job_of_another_tenant_or_without_key(
    client: httpx.AsyncClient, auth_headers: Headers, other_headers: Headers
) -> None:
    job_id = await _submit(client, auth_headers, "http://example.com/mine")
    assert (await client.get(f"{JOBS}/{job_id}", headers=other_headers)).status_code == 404
    assert (await client.get(f"{JOBS}/{job_id}")).status_code == 401
    assert (await client.get(f"{JOBS}/{uuid.uuid4()}", headers=auth_headers)).status_code == 404


async def test_openapi_keeps_the_get_job_schema(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    ok = spec["paths"][f"{JOBS}/{{job_id}}"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobPublic"}


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the database verifications of keys (cache misses that reach the database)."""
    seen: list[str] = []
    verify = apikeys._verify

    async def counting(session: Any, key_hash: str, prefix: str) -> Any:
        seen.append(prefix)
        await asyncio.sleep(0.05)  # keep the lookup in flight while the others arrive
        return await verify(session, key_hash, prefix)

    monkeypatch.setattr(apikeys, "_verify", counting)
    apikeys.cache.clear()
    return seen


async def test_concurrent_cache_misses_share_one_lookup(
    db: ConnectionManager, api_key: str, lookups: list[str]
) -> None:
    async def verify() -> apikeys.Principal | None:
        async with db.session() as session:
            return await apikeys.authenticate(session, api_key)

    principals = await asyncio.gather(*(verify() for _ in range(20)))
    assert all(p is not None and p.tenant == "tenant-a" for p in principals)
    assert len(lookups) == 1


async def test_a_failed_shared_lookup_is_retried_by_the_waiters(
    db: ConnectionManager, api_key: str, lookups: list[str]
) -> None:
    async def verify() -> apikeys.Principal | None:
        async with db.session() as session:
            return await apikeys.authenticate(session, api_key)

    first = asyncio.create_task(verify())
    while not lookups:  # the first request's lookup is in flight
        await asyncio.sleep(0.001)
    others = [asyncio.create_task(verify()) for _ in range(5)]
    await asyncio.sleep(0.01)  # all five wait for it
    first.cancel()  # it dies (a cancelled request, an outage)
    with pytest.raises(asyncio.CancelledError):
        await first
    principals = await asyncio.gather(*others)
    assert all(p is not None and p.tenant == "tenant-a" for p in principals)
    assert len(lookups) == 2  # the cancelled one, then one for all five waiters


async def test_submissions_to_one_host_do_not_wait_for_each_other(
    db: ConnectionManager, sql: SqlRun
) -> None:
    """A submission still uncommitted does not hold up the next one for the same host."""
    first = ScrapeCreate.model_validate({"urls": ["http://busy.example/a"]})
    second = ScrapeCreate.model_validate({"urls": ["http://busy.example/b"]})
    async with db.session() as s:
        await jobs.submit_job(s, "t", first)  # the host's row exists from here on
    async with db.session() as open_one:
        await jobs.submit_job(open_one, "t", first)  # not committed while the next runs
        async with db.session() as other:
            await (await other.connection()).execute(text("SET LOCAL lock_timeout = '500ms'"))
            _, created = await jobs.submit_job(other, "t", second)
            assert created
    rows = await sql("SELECT max_concurrency, delay_ms FROM hosts WHERE host = 'busy.example'")
    assert [tuple(r) for r in rows] == [(8, 0)]  # submit_job's default host limit


async def test_crawl_politeness_sets_its_seed_hosts_limits(
    db: ConnectionManager, sql: SqlRun
) -> None:
    async with db.session() as s:
        await jobs.submit_job(s, "t", ScrapeCreate.model_validate({"urls": ["http://p.example/"]}))
    crawl = CrawlCreate.model_validate(
        {"seeds": ["http://p.example/"], "politeness": {"per_host_concurrency": 2, "delay_ms": 250}}
    )
    async with db.session() as s:
        await jobs.submit_job(s, "t", crawl)
    rows = await sql("SELECT max_concurrency, delay_ms FROM hosts WHERE host = 'p.example'")
    assert [tuple(r) for r in rows] == [(2, 250)]


@pytest.fixture
def resolved(app: Any) -> list[int]:
    """One entry per request whose principal FastAPI's dependency resolved (that is, a
    request the hot paths handed to the app)."""
    calls: list[int] = []

    async def counting(request: Request, credentials: Credentials) -> Any:
        calls.append(1)
        return await get_principal(request, credentials)

    app.dependency_overrides[get_principal] = counting
    return calls


def _expire_soon(key: str, left: float = 0.2) -> None:
    """Move a cached key's entry into its last moments (the refresh-ahead window)."""
    key_hash = apikeys.hash_key(key)
    principal, _ = apikeys.cache._entries[key_hash]
    apikeys.cache._entries[key_hash] = (principal, time.monotonic() + left)


async def _refreshed() -> None:
    while apikeys._refreshes:
        await asyncio.gather(*apikeys._refreshes)


async def test_a_key_in_use_is_reverified_ahead_of_expiry(
    resolved: list[int],
    client: httpx.AsyncClient,
    auth_headers: Headers,
    api_key: str,
    lookups: list[str],
) -> None:
    job_id = await _submit(client, auth_headers, "http://example.com/r")  # verifies, caches
    assert len(lookups) == 1
    calls = len(resolved)
    _expire_soon(api_key)
    # answered from the cache at once, still before routing (no dependency runs), while
    # one lookup runs beside them
    read = await client.get(f"{JOBS}/{job_id}", headers=auth_headers)
    posted = await client.post(
        "/api/v1/scrape", headers=auth_headers, json={"urls": ["http://example.com/r2"]}
    )
    assert (read.status_code, posted.status_code) == (200, 202)
    assert len(resolved) == calls
    await _refreshed()
    assert len(lookups) == 2
    principal, due = apikeys.cached_principal(api_key)
    assert principal is not None and not due  # a fresh CACHE_TTL_S


async def test_a_refresh_that_finds_the_key_revoked_drops_it(
    client: httpx.AsyncClient, auth_headers: Headers, api_key: str, sql: SqlRun
) -> None:
    job_id = await _submit(client, auth_headers, "http://example.com/v")
    # revoked by another process: this one's cache does not know yet
    await sql("UPDATE api_keys SET revoked_at = now() WHERE tenant = 'tenant-a'")
    _expire_soon(api_key)
    assert (await client.get(f"{JOBS}/{job_id}", headers=auth_headers)).status_code == 200
    await _refreshed()
    assert apikeys.cached_principal(api_key) == (None, False)
    assert (await client.get(f"{JOBS}/{job_id}", headers=auth_headers)).status_code == 401


async def test_submission_on_an_unused_session_is_committed_by_its_statement(
    db: ConnectionManager, count: Count
) -> None:
    request = ScrapeCreate.model_validate({"urls": ["http://example.com/own"]})
    async with db.session() as session:
        await jobs.submit_job(session, "t", request)
        # visible to everyone already: the statement was its own transaction
        assert await count("jobs") == 1
        assert await count("tasks") == 1


async def test_submission_inside_a_begun_transaction_commits_with_it(
    db: ConnectionManager, count: Count
) -> None:
    request = ScrapeCreate.model_validate({"urls": ["http://example.com/joined"]})

    class Abort(Exception):
        pass

    async def unit_of_work() -> None:
        async with db.session() as session:
            await session.execute(text("SELECT 1"))  # the caller's unit of work began
            await jobs.submit_job(session, "t", request)
            assert await count("jobs") == 0  # not committed yet
            raise Abort

    with pytest.raises(Abort):
        await unit_of_work()
    assert await count("jobs") == 0
    assert await count("tasks") == 0


async def test_link_enqueue_probes_the_dedupe_index_per_link(db: ConnectionManager) -> None:
    """Enqueueing a page's links looks each one up in the unique index: no join that
    compares every link with every task of the job (the planner chose one under the
    statement's LIMIT, which made the frontier's growth quadratic)."""
    from app.services import queue
    from tests.support.jobs import create_job

    job_id = await create_job(db, ["http://site.example/"])
    async with db.connect() as conn:
        await conn.execute(
            text("UPDATE jobs SET kind = 'crawl', status = 'running' WHERE id = :j"), {"j": job_id}
        )
        first = [(f"http://site.example/p/{n}", 1) for n in range(1500)]
        assert await queue.enqueue_links(conn, job_id, first) == 1500

    links = [f"http://site.example/p/{n}" for n in range(1000, 2000)]  # half known
    statement, names = queue._SETTLE_RAW
    params = queue._settle_params([], {job_id: [(u, 1) for u in links]})
    logged: list[str] = []

    def log(_conn: object, message: object) -> None:
        logged.append(str(message))

    async with db.driver() as driver:
        # the settling runs inside trawler_settle(): auto_explain shows its statements' plans
        try:
            await driver.execute("LOAD 'auto_explain'")
        except asyncpg.UndefinedFileError:
            # (pgserver's embedded build ships no contrib modules)
            pytest.skip("this PostgreSQL has no auto_explain to show a function's plans")
        driver.add_log_listener(log)
        explained = driver.transaction()
        await explained.start()  # the insert is rolled back below
        try:
            await driver.execute(
                "SET LOCAL auto_explain.log_min_duration = 0; "
                "SET LOCAL auto_explain.log_nested_statements = on; "
                "SET LOCAL auto_explain.log_analyze = on; SET LOCAL client_min_messages = log"
            )
            await driver.fetch(statement, *(params[n] for n in names))
        finally:
            await explained.rollback()
            driver.remove_log_listener(log)
    plans = [m for m in logged if "Insert on tasks" in m]
    assert len(plans) == 1, logged
    plan = plans[0]
    # no join against the job's tasks: one index probe per link (1,000 links)
    assert "Anti Join" not in plan, plan
    probe = [line for line in plan.splitlines() if "Scan using uq_tasks_job_url_hash" in line]
    assert probe and all("loops=1000)" in line for line in probe), plan
    async with db.connect() as conn:
        assert await queue.enqueue_links(conn, job_id, [(u, 1) for u in links]) == 500


async def test_get_job_is_answered_before_routing_once_the_key_is_known(
    resolved: list[int],
    client: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
) -> None:
    """A cached key reading its own job is answered by HotPathMiddleware (no dependency
    runs); a first use of a key, another tenant's job or a bad id go through the app."""
    job_id = await _submit(client, auth_headers, "http://example.com/hot")  # the key cached
    calls = len(resolved)
    first = await client.get(f"{JOBS}/{job_id}", headers=auth_headers)
    again = await client.get(f"{JOBS}/{job_id}", headers=auth_headers)
    assert first.status_code == again.status_code == 200
    assert first.content == again.content
    assert first.headers["content-type"] == "application/json"
    assert "x-request-id" in first.headers  # still inside the observability middleware
    assert len(resolved) == calls  # neither read went through FastAPI's dependencies

    other = await client.get(f"{JOBS}/{job_id}", headers=other_headers)
    assert other.status_code == 404
    assert other.headers["content-type"] == "application/problem+json"
    assert len(resolved) > calls  # the app answered it
    upper = await client.get(f"{JOBS}/{job_id.upper()}", headers=auth_headers)
    assert upper.status_code == 200 and upper.content == first.content  # the app's path
