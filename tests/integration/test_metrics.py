"""GET /metrics: who may read it, what it exposes (pool, queue, jobs, workers, pages by
outcome, fetch and HTTP latency), and what it still answers when the database is gone."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from app.database.connection import ConnectionManager
from app.main import create_app
from app.services.metrics import PageStats
from tests.conftest import make_settings
from tests.integration.conftest import Headers
from tests.integration.test_api_jobs import settle, submit

TOKEN = "m3tr1cs-t0ken-for-the-scraper-0123456789"


def samples(body: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line (comments checked separately)."""
    values: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def check_format(body: str) -> None:
    """Each family is declared once, before its samples; sample names are well formed."""
    declared: list[str] = []
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"gauge", "counter", "histogram"}
            assert name not in declared, f"{name} declared twice"
            declared.append(name)
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})?', name), line
            assert value in {"+Inf", "-Inf"} or float(value) == float(value), line
            assert any(line.startswith(d) for d in declared), line


async def test_metrics_need_an_admin_key(
    client: httpx.AsyncClient, auth_headers: Headers, admin_headers: Headers
) -> None:
    assert (await client.get("/metrics")).status_code == 401
    assert (
        await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    ).status_code == 401
    assert (await client.get("/metrics", headers=auth_headers)).status_code == 403
    allowed = await client.get("/metrics", headers=admin_headers)
    assert allowed.status_code == 200
    assert allowed.headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_metrics_expose_pool_queue_jobs_workers_pages_and_http_latency(
    app: FastAPI,
    client: httpx.AsyncClient,
    auth_headers: Headers,
    admin_headers: Headers,
    db: ConnectionManager,
) -> None:
    stats = app.state.page_stats = PageStats()
    stats.SETTLE_S = 0.0  # count pages as soon as they are seen (the test waits for none)
    first = await client.get("/metrics", headers=admin_headers)  # pages counted from here
    check_format(first.text)
    before = samples(first.text)
    assert before['trawler_pages_fetched_total{outcome="ok"}'] == 0

    queued = await submit(client, auth_headers, ["https://m.example/1", "https://m.example/2"])
    done = await submit(
        client, auth_headers, ["https://m.example/a", "https://m.example/b", "https://m.example/c"]
    )
    await settle(
        db,
        done["id"],
        {
            "https://m.example/a": "succeeded",
            "https://m.example/b": "succeeded",
            "https://m.example/c": "failed",
        },
    )
    assert (
        await client.get(f"/api/v1/jobs/{queued['id']}", headers=auth_headers)
    ).status_code == 200
    await client.get(f"/api/v1/jobs/{queued['id']}", headers=auth_headers)

    response = await client.get("/metrics", headers=admin_headers)
    check_format(response.text)
    m = samples(response.text)
    # this process's pool
    pool = db.settings.pool_size
    assert m["trawler_db_pool_size"] == pool
    assert m["trawler_db_pool_checkouts_total"] >= 4
    assert m["trawler_db_pool_max_overflow"] == db.settings.max_overflow
    assert 'trawler_db_pool_wait_seconds{stat="p99"}' in m
    # the cluster, from the database
    assert m["trawler_cluster_figures_ok"] == 1
    assert m['trawler_queue_tasks{status="queued"}'] == 2
    assert m['trawler_queue_tasks{status="leased"}'] == 0
    assert m['trawler_queue_tasks_by_priority{priority="0",status="queued"}'] == 2
    assert m["trawler_queue_paused"] == 0
    assert m['trawler_jobs{status="queued"}'] == 1
    assert m['trawler_jobs{status="completed"}'] == 1
    assert m['trawler_jobs{status="running"}'] == 0
    assert m['trawler_workers{status="live"}'] == 0
    assert m['trawler_pages_fetched_total{outcome="ok"}'] == 2
    assert m['trawler_pages_fetched_total{outcome="http_error"}'] == 1
    assert m['trawler_pages_fetched_total{outcome="fetch_error"}'] == 0
    # settle() stores every page with elapsed_ms = 12
    assert m["trawler_fetch_duration_seconds_count"] == 3
    assert m['trawler_fetch_duration_seconds_bucket{le="0.05"}'] == 3
    assert m['trawler_fetch_duration_seconds_bucket{le="+Inf"}'] == 3
    assert m["trawler_fetch_duration_seconds_sum"] == pytest.approx(0.036)
    # HTTP latency by route template (not by concrete path), this process's own
    get_job = 'method="GET",route="/api/v1/jobs/{job_id}",status="2xx"'
    assert m[f"trawler_http_request_duration_seconds_count{{{get_job}}}"] == 2
    assert m[f'trawler_http_request_duration_seconds_bucket{{{get_job},le="+Inf"}}'] == 2
    submitted = 'method="POST",route="/api/v1/scrape",status="2xx"'
    assert m[f"trawler_http_request_duration_seconds_count{{{submitted}}}"] == 2
    assert not any(queued["id"] in name for name in m)

    # counted once: a later scrape adds only what is new
    again = samples((await client.get("/metrics", headers=admin_headers)).text)
    assert again['trawler_pages_fetched_total{outcome="ok"}'] == 2


@pytest.fixture
async def token_client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(make_settings(db_url, metrics_token=TOKEN), migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


async def test_the_metrics_token_opens_metrics_and_nothing_else(
    token_client: httpx.AsyncClient, auth_headers: Headers
) -> None:
    token = {"Authorization": f"Bearer {TOKEN}"}
    response = await token_client.get("/metrics", headers=token)
    assert response.status_code == 200 and "trawler_queue_tasks" in response.text
    wrong = {"Authorization": f"Bearer {TOKEN[:-1]}x"}
    assert (await token_client.get("/metrics", headers=wrong)).status_code == 401
    assert (await token_client.get("/metrics", headers=auth_headers)).status_code == 403
    assert (await token_client.get("/api/v1/admin/queue", headers=token)).status_code == 401
    assert (await token_client.get("/api/v1/jobs", headers=token)).status_code == 401


def test_weak_metrics_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="24 characters"):
        make_settings("postgresql://x@localhost/db", metrics_token="changeme")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_answer_fast_without_the_database() -> None:
    """Database refused: the process's own figures still come, the cluster ones are
    marked missing, within the admin query timeout."""
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/none"
    application = create_app(
        make_settings(url, metrics_token=TOKEN, admin_query_timeout=1.0), migrate=False
    )
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            started = time.perf_counter()
            response = await c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            elapsed = time.perf_counter() - started
    assert response.status_code == 200
    m = samples(response.text)
    assert m["trawler_cluster_figures_ok"] == 0
    assert "trawler_db_pool_size" in m and "trawler_queue_tasks" not in response.text
    assert elapsed < 1.5


async def test_request_ids_are_kept_or_made(client: httpx.AsyncClient) -> None:
    kept = await client.get("/health/live", headers={"X-Request-ID": "abc-123.x"})
    assert kept.headers["x-request-id"] == "abc-123.x"
    made = await client.get("/health/live", headers={"X-Request-ID": "bad id\n" * 20})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    other = await client.get("/health/live")
    assert other.headers["x-request-id"] != made.headers["x-request-id"]
