"""Tenancy and auth across every job route, key revocation, and the per-tenant limits."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from app.services import apikeys
from tests.conftest import make_settings
from tests.integration.conftest import Count, Headers, SqlRun, bearer, make_key
from tests.integration.test_api_jobs import settle, submit

API = "/api/v1"
JOBS = f"{API}/jobs"


def served_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, from its own route table
    (included routers walked with their prefixes): a route added later is covered without
    anyone listing it."""

    def walk(routes: Iterable[Any], prefix: str) -> Iterator[tuple[str, str]]:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                yield from walk(included.routes, prefix + route.include_context.prefix)
            elif isinstance(route, APIRoute):
                yield from ((method, prefix + route.path) for method in route.methods)

    return sorted(set(walk(app.router.routes, "")))


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    return [(m, p) for m, p in served_routes(app) if p.startswith(API) and m != "HEAD"]


def job_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every /api/v1 route that takes a job id."""
    return [(m, p) for m, p in api_routes(app) if "{job_id}" in p]


def _with_job(template: str, job_id: str) -> str:
    """The route's URL for this job; other path parameters (a delivery number, ...) get 1."""
    return re.sub(r"\{[a-z_]+\}", "1", template.replace("{job_id}", job_id))


async def _snapshot(sql: SqlRun, job_id: str) -> tuple[Any, ...]:
    rows = await sql(
        "SELECT j.status, j.total, j.queued, j.succeeded, j.failed, j.updated_at, "
        "(SELECT count(*) FROM pages WHERE job_id = j.id), "
        "(SELECT count(*) FROM tasks WHERE job_id = j.id AND status = 'queued'), "
        "(SELECT count(*) FROM job_events WHERE job_id = j.id) "
        "FROM jobs j WHERE j.id = :id",
        id=job_id,
    )
    return tuple(rows[0]) if rows else ()


async def test_another_tenant_cannot_reach_a_job_by_any_route(
    app: FastAPI,
    client: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
    sql: SqlRun,
) -> None:
    routes = job_routes(app)
    expected = {
        ("GET", f"{JOBS}/{{job_id}}"),
        ("GET", f"{JOBS}/{{job_id}}/pages"),
        ("GET", f"{JOBS}/{{job_id}}/events"),
        ("POST", f"{JOBS}/{{job_id}}/cancel"),
        ("POST", f"{JOBS}/{{job_id}}/retry"),
        ("DELETE", f"{JOBS}/{{job_id}}"),
    }
    assert expected <= set(routes), routes  # the matrix sees every known route

    # tenant A: a live job and a finished one with a failed page (retry, delete, export
    # and pages all have something to act on)
    live = await submit(client, auth_headers, ["https://a.example/live"])
    done = await submit(client, auth_headers, ["https://a.example/ok", "https://a.example/bad"])
    await settle(
        db, done["id"], {"https://a.example/ok": "succeeded", "https://a.example/bad": "failed"}
    )
    before = {j: await _snapshot(sql, j) for j in (live["id"], done["id"])}

    for job_id in (live["id"], done["id"]):
        for method, template in routes:
            url = _with_job(template, job_id)
            response = await client.request(method, url, headers=other_headers)
            assert response.status_code == 404, (method, url, response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json"
        for action in ("cancel", "retry", "delete"):
            response = await client.post(
                f"{JOBS}/bulk", json={"action": action, "ids": [job_id]}, headers=other_headers
            )
            assert response.status_code == 200, response.text
            assert [r["outcome"] for r in response.json()["results"]] == ["not_found"]
    listed = await client.get(JOBS, headers=other_headers)
    assert listed.status_code == 200 and listed.json()["items"] == []
    assert {j: await _snapshot(sql, j) for j in before} == before  # nothing moved

    # the owner reaches the same routes (the 404s above were not a broken route)
    for method, template in routes:
        if method != "GET" or template.count("{") > 1:
            continue
        url = _with_job(template, done["id"])
        response = await client.request(method, url, headers=auth_headers)
        assert response.status_code == 200, (url, response.text)
    listed = await client.get(JOBS, headers=auth_headers)
    assert {j["id"] for j in listed.json()["items"]} == {live["id"], done["id"]}
    cancel = await client.post(f"{JOBS}/{live['id']}/cancel", headers=auth_headers)
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
    retry = await client.post(f"{JOBS}/{done['id']}/retry", headers=auth_headers)
    assert retry.status_code == 200 and retry.json()["status"] == "queued"
    gone = await client.delete(f"{JOBS}/{live['id']}", headers=auth_headers)
    assert gone.status_code == 204


def _fill(path: str) -> str:
    """A concrete URL: ids are random UUIDs, other path parameters 1."""
    for name in ("job_id", "worker_id", "key_id"):
        path = path.replace(f"{{{name}}}", str(uuid.uuid4()))
    return re.sub(r"\{[a-z_]+\}", "1", path)


async def test_every_api_route_needs_a_valid_unrevoked_key(
    app: FastAPI, client: httpx.AsyncClient, db: ConnectionManager, admin_headers: Headers
) -> None:
    key = await make_key(db, "soon-revoked", tenant="tenant-r")
    calls = [(method, _fill(path)) for method, path in api_routes(app)]
    assert len(calls) >= 20
    before = await client.get(JOBS, headers=bearer(key))
    assert before.status_code == 200  # valid (and now cached) until revoked

    listed = await client.get(f"{API}/admin/api-keys", headers=admin_headers)
    key_id = next(k["id"] for k in listed.json() if k["tenant"] == "tenant-r")
    revoked = await client.delete(f"{API}/admin/api-keys/{key_id}", headers=admin_headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None

    for headers in (
        {},
        {"Authorization": "Bearer trw_00000000_" + "0" * 40},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        bearer(key),  # revoked a moment ago, verified and cached before
    ):
        for method, url in calls:
            response = await client.request(method, url, json={}, headers=headers)
            assert response.status_code == 401, (method, url, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"


async def test_revocation_by_another_process_reaches_this_one_at_once(
    app: FastAPI, client: httpx.AsyncClient, db: ConnectionManager, sql: SqlRun
) -> None:
    """A revocation committed elsewhere (NOTIFY trawler_keys) drops the cached key here
    well before the cache entry would expire."""
    key = await make_key(db, "elsewhere", tenant="tenant-e")
    assert (await client.get(JOBS, headers=bearer(key))).status_code == 200
    await asyncio.wait_for(app.state.pg_listener.connected.wait(), 5)
    principal, _ = apikeys.cached_principal(key)
    assert principal is not None
    # what `trawler apikey revoke` in another process commits: no access to this cache
    revoked_at = time.monotonic()
    await sql(
        "WITH k AS (UPDATE api_keys SET revoked_at = now() WHERE tenant = 'tenant-e' "
        "RETURNING id) SELECT pg_notify('trawler_keys', id::text) FROM k"
    )
    while apikeys.cached_principal(key)[0] is not None:
        assert time.monotonic() - revoked_at < 0.5 * apikeys.CACHE_TTL_S, "cache kept the key"
        await asyncio.sleep(0.005)
    assert (await client.get(JOBS, headers=bearer(key))).status_code == 401


def test_a_verification_racing_a_revocation_does_not_cache_the_key() -> None:
    cache = apikeys._KeyCache()
    principal = apikeys.Principal(uuid.uuid4(), "t", apikeys.KeyRole.user)
    started = cache.epoch  # a lookup reads the row (not yet revoked) ...
    cache.discard_key(principal.key_id)  # ... the revocation commits meanwhile
    cache.put("h", principal, started)
    assert cache.get("h") is None
    cache.put("h", principal, cache.epoch)
    assert cache.get("h") == principal


# --------------------------------------------------------------------------------------
# limits


@pytest.fixture
async def limited(db_url: str, request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    overrides: dict[str, Any] = request.param
    settings: Settings = make_settings(db_url, **overrides)
    application = create_app(settings, migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


RATE = {"tenant_submit_rate": 1.0, "tenant_submit_burst": 3, "tenant_max_active_jobs": 0}


@pytest.mark.parametrize("limited", [RATE], indirect=True)
async def test_rate_limit_answers_429_then_recovers(
    limited: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    count: Count,
    sql: SqlRun,
) -> None:
    body = {"urls": ["https://r.example/"]}
    started = time.monotonic()
    burst = [await limited.post(f"{API}/scrape", json=body, headers=auth_headers) for _ in range(3)]
    assert [r.status_code for r in burst] == [202, 202, 202]
    refused = await limited.post(f"{API}/scrape", json=body, headers=auth_headers)
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    assert "rate limit" in refused.json()["detail"]
    preview = await limited.post(
        f"{API}/scrape/preview", json={"url": "https://r.example/"}, headers=auth_headers
    )
    assert preview.status_code == 429  # previews count against the same rate
    assert await count("jobs") == 3  # the refusals created nothing
    # another tenant has its own allowance
    other = await limited.post(f"{API}/scrape", json=body, headers=other_headers)
    assert other.status_code == 202
    # one emission interval (1 / rate) after the burst, one more submission is admitted,
    # and only one (the next comes due two intervals after the burst)
    interval = 1 / RATE["tenant_submit_rate"]
    await asyncio.sleep(max(0.0, started + interval + 0.2 - time.monotonic()))
    again = await limited.post(f"{API}/scrape", json=body, headers=auth_headers)
    assert again.status_code == 202, again.text
    after = await limited.post(f"{API}/scrape", json=body, headers=auth_headers)
    assert time.monotonic() - started < 2 * interval, "too slow to tell"
    assert after.status_code == 429
    assert await count("jobs") == 5
    # rate state lives in an UNLOGGED table: the admission costs no WAL flush
    assert await sql(
        "SELECT relpersistence::text FROM pg_class WHERE relname = 'tenant_limits'"
    ) == [("u",)]


CAP = {"tenant_max_active_jobs": 2, "tenant_submit_rate": 0.0}


@pytest.mark.parametrize("limited", [CAP], indirect=True)
async def test_active_jobs_cap_is_exact_under_concurrency_and_frees_up(
    limited: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
    count: Count,
) -> None:
    body = {"urls": ["https://c.example/"]}
    answers = await asyncio.gather(
        *(limited.post(f"{API}/scrape", json=body, headers=auth_headers) for _ in range(6))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [202, 202, 429, 429, 429, 429], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 429)
    assert "limit of 2 active jobs" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    assert await count("jobs") == 2
    assert (
        await limited.post(f"{API}/scrape", json=body, headers=other_headers)
    ).status_code == 202

    accepted = [r.json() for r in answers if r.status_code == 202]
    # a finished job frees its slot; retrying it takes the slot again
    await settle(db, accepted[0]["id"], {"https://c.example/": "failed"})
    third = await limited.post(f"{API}/scrape", json=body, headers=auth_headers)
    assert third.status_code == 202
    retry = await limited.post(f"{JOBS}/{accepted[0]['id']}/retry", headers=auth_headers)
    assert retry.status_code == 429, retry.text
    bulk = await limited.post(
        f"{JOBS}/bulk", json={"action": "retry", "ids": [accepted[0]["id"]]}, headers=auth_headers
    )
    assert bulk.status_code == 429
    cancelled = await limited.post(f"{JOBS}/{third.json()['id']}/cancel", headers=auth_headers)
    assert cancelled.status_code == 200
    retry = await limited.post(f"{JOBS}/{accepted[0]['id']}/retry", headers=auth_headers)
    assert retry.status_code == 200 and retry.json()["status"] == "queued"
