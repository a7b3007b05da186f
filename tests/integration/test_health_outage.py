"""Health and ordinary requests while the database connection is cut, then restored.

A TCP proxy inside the test stands between the app and the test PostgreSQL. Cuts:
- refuse: every proxied connection is dropped and nothing listens any more (server gone);
- blackhole: every proxied connection is dropped; new ones are accepted and never get a
  byte back (a dead host, a firewall that drops packets);
- freeze: open connections stay open but stop carrying data, new ones are black-holed
  (a network partition): the nastiest, as nothing ever fails on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app.api.deps import SessionDep
from app.config import Settings
from app.main import create_app
from app.services import apikeys
from tests.conftest import make_settings
from tests.support.db_proxy import Cut, Proxy, proxied_url, upstream_opener

pytestmark = pytest.mark.slow

# The bound for every health answer while the database is unreachable.
HEALTH_BOUND_S = 2.0
RECOVERY_BOUND_S = 15.0


async def _db_roundtrip(session: SessionDep) -> dict[str, int]:
    """An ordinary DB-backed route: one session per request, like every API route."""
    value = (await session.execute(text("SELECT 1"))).scalar_one()
    return {"value": int(value)}


@pytest.fixture
async def proxy(pg_server: str) -> AsyncIterator[Proxy]:
    p = Proxy(upstream_opener(pg_server))
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def proxied_settings(db_url: str, proxy: Proxy) -> Settings:
    return make_settings(
        proxied_url(db_url, proxy.port),
        pool_size=2,
        max_overflow=1,
        pool_timeout=1.0,
        db_command_timeout=3.0,
        # production defaults: the health probe's own limit must be what bounds it
        db_connect_timeout=Settings.model_fields["db_connect_timeout"].default,
        health_timeout=Settings.model_fields["health_timeout"].default,
    )


@pytest.fixture
async def outage_client(proxied_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    application: FastAPI = create_app(proxied_settings, migrate=False)
    application.add_api_route("/_test/db", _db_roundtrip, methods=["GET"])
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


async def _timed_get(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await client.get(path)
    return response, time.perf_counter() - started


async def _wait_ready(client: httpx.AsyncClient, bound_s: float) -> float:
    started = time.perf_counter()
    while True:
        response = await client.get("/health/ready")
        elapsed = time.perf_counter() - started
        if response.status_code == 200:
            return elapsed
        assert elapsed < bound_s, f"not ready {elapsed:.1f}s after restore: {response.text}"
        await asyncio.sleep(0.25)


@pytest.mark.parametrize("cut", ["refuse", "blackhole", "freeze"])
async def test_health_is_bounded_during_outage_and_recovers(
    outage_client: httpx.AsyncClient,
    proxy: Proxy,
    proxied_settings: Settings,
    cut: Cut,
) -> None:
    client = outage_client
    settings = proxied_settings

    # --- database reachable through the proxy
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    details = await client.get("/health")
    assert details.status_code == 200, details.text
    body = details.json()
    assert body["status"] == "ok"
    assert body["database"]["ok"] is True
    pool = body["pool"]
    assert pool["size"] == settings.pool_size
    assert pool["max_overflow"] == settings.max_overflow
    assert pool["checkouts"] >= 1 and pool["connects"] >= 1
    assert set(pool["wait_ms"]) == {"p50", "p99", "max"}
    again_pool = (await client.get("/health")).json()["pool"]
    assert again_pool["checkouts"] > pool["checkouts"]  # the counters move
    ok = await client.get("/_test/db")
    assert ok.status_code == 200 and ok.json() == {"value": 1}
    accepted_before = proxy.accepted

    await proxy.cut(cut)
    timings: dict[str, list[float]] = {}

    # --- an ordinary DB-backed request: 503 + Retry-After, bounded by the DB timeouts.
    # Refused: at once. Black hole: the connect timeout. Frozen: the pooled connection's
    # pre-ping waits for the command timeout, then a reconnect meets the black hole.
    bound = {
        "refuse": settings.pool_timeout,
        "blackhole": settings.db_connect_timeout + settings.pool_timeout,
        "freeze": settings.db_command_timeout + settings.db_connect_timeout + 2.0,
    }[cut] + 0.5
    response, elapsed = await _timed_get(client, "/_test/db")
    timings["/_test/db"] = [elapsed]
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < bound, f"DB-backed request took {elapsed:.2f}s during the outage"

    # --- the probes: each answers within the bound, again and again
    for _ in range(2):
        for path, expected in (("/health/live", 200), ("/health/ready", 503), ("/health", 503)):
            response, elapsed = await _timed_get(client, path)
            timings.setdefault(path, []).append(elapsed)
            assert response.status_code == expected, (path, response.text)
            assert elapsed < HEALTH_BOUND_S, f"{path} took {elapsed:.2f}s during the outage"
            if path == "/health/ready":
                assert response.headers["Retry-After"]
                assert response.json()["reason"]
            if path == "/health":
                down = response.json()
                assert down["status"] == "down"
                assert down["database"]["ok"] is False
                assert "checkouts" in down["pool"]
    if cut != "refuse":
        assert proxy.accepted > accepted_before  # the app really was talking to the hole

    # --- restore the path: readiness comes back by itself, same app, same pool
    await proxy.restore()
    recovered_in = await _wait_ready(client, RECOVERY_BOUND_S)
    again = await client.get("/_test/db")
    assert again.status_code == 200, again.text
    after = (await client.get("/health")).json()
    assert after["status"] == "ok"
    assert after["pool"]["invalidations"] >= 1  # the dropped connections were noticed

    summary = ", ".join(f"{p} max {max(t) * 1000:.0f} ms" for p, t in timings.items())
    print(f"\n[{cut}] {summary}; ready again {recovered_in * 1000:.0f} ms after restore")


async def test_submission_on_the_fast_path_gets_503_during_outage(
    proxied_settings: Settings, proxy: Proxy
) -> None:
    """POST /scrape answered by the middleware (a key it knows) meets the outage as the
    routes do: 503 + Retry-After at once, nothing half-done; accepted again afterwards."""
    application = create_app(proxied_settings, migrate=False)
    async with application.router.lifespan_context(application):
        async with application.state.db.session() as session:
            _, key = await apikeys.create_key(session, "outage", tenant="outage")
        headers = {"Authorization": f"Bearer {key}"}
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            body = {"urls": ["http://example.com/outage"]}
            assert (await c.post("/api/v1/scrape", json=body, headers=headers)).status_code == 202
            await proxy.cut("refuse")
            started = time.perf_counter()
            refused = await c.post("/api/v1/scrape", json=body, headers=headers)
            elapsed = time.perf_counter() - started
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert int(refused.headers["retry-after"]) >= 1
            assert elapsed < proxied_settings.pool_timeout + 0.5
            await proxy.restore()
            await _wait_ready(c, RECOVERY_BOUND_S)
            again = await c.post("/api/v1/scrape", json=body, headers=headers)
            assert again.status_code == 202, again.text
