"""POST /api/v1/scrape and /crawl answered by HotPathMiddleware before FastAPI's routing:
the same answers as the routes (202 + Location, idempotent replays, 409, 422, 429), the
executors' wake-up after the commit, coalesced."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request

from app.api.deps import Credentials, get_principal
from app.database.connection import ConnectionManager
from app.main import create_app
from app.services.queue import NOTIFY_TASKS
from app.services.wakeups import TaskWaker
from tests import pg
from tests.conftest import make_settings
from tests.integration.conftest import Count, Headers, SqlRun, bearer, make_key

SCRAPE = "/api/v1/scrape"
CRAWL = "/api/v1/crawl"
JOBS = "/api/v1/jobs"


class Resolutions:
    """Counts the app's key resolutions: a request the middleware answers makes none."""

    def __init__(self, app: FastAPI) -> None:
        self.count = 0

        async def counting(request: Request, credentials: Credentials) -> Any:
            self.count += 1
            return await get_principal(request, credentials)

        app.dependency_overrides[get_principal] = counting


@pytest.fixture
async def warm(client: httpx.AsyncClient, auth_headers: Headers) -> None:
    """The key verified once by the app (a GET of a missing job), so it is cached."""
    missing = await client.get(f"{JOBS}/{uuid.uuid4()}", headers=auth_headers)
    assert missing.status_code == 404


async def test_submission_is_answered_before_routing(
    app: FastAPI,
    client: httpx.AsyncClient,
    auth_headers: Headers,
    warm: None,
    count: Count,
    sql: SqlRun,
) -> None:
    seen = Resolutions(app)
    body = {"urls": ["http://example.com/a", "http://example.com/b#x"], "priority": 4}
    response = await client.post(SCRAPE, json=body, headers=auth_headers)
    assert response.status_code == 202, response.text
    assert seen.count == 0  # no FastAPI dependency ran
    assert response.headers["content-type"] == "application/json"
    assert "x-request-id" in response.headers  # still inside the observability middleware
    job = response.json()
    assert response.headers["location"] == f"{JOBS}/{job['id']}"
    assert job["status"] == "queued" and job["priority"] == 4
    assert job["progress"] == {"total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0}
    # the same bytes as the resource itself
    read = await client.get(response.headers["location"], headers=auth_headers)
    assert read.content == response.content
    rows = await sql("SELECT url FROM tasks WHERE job_id = :id ORDER BY url", id=job["id"])
    assert [r[0] for r in rows] == ["http://example.com/a", "http://example.com/b"]

    crawl = await client.post(
        CRAWL, json={"seeds": ["http://example.com/"], "follow": {"max_pages": 5}},
        headers=auth_headers,
    )  # fmt: skip
    assert crawl.status_code == 202, crawl.text
    assert crawl.json()["kind"] == "crawl"
    assert seen.count == 0
    assert await count("jobs") == 2


async def test_fast_and_routed_answers_agree(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: Headers, warm: None, count: Count
) -> None:
    """The middleware's answer and the route's (forced by a body the fast path leaves to the
    app: not `application/json`) have the same shape, field for field."""
    seen = Resolutions(app)
    body = b'{"urls": ["http://example.com/same"], "max_attempts": 2}'
    fast = await client.post(
        SCRAPE, content=body, headers={**auth_headers, "Content-Type": "application/json"}
    )
    routed = await client.post(
        SCRAPE,
        content=body,
        headers={**auth_headers, "Content-Type": "application/vnd.trawler+json"},
    )
    assert fast.status_code == routed.status_code == 202
    assert seen.count == 1  # only the second went through the app (a +json type)
    a, b = fast.json(), routed.json()
    assert a.keys() == b.keys()
    for key in ("id", "created_at"):
        a.pop(key), b.pop(key)
    assert a == b
    assert await count("jobs") == 2


async def test_idempotency_key_on_the_fast_path(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: Headers, warm: None, count: Count
) -> None:
    seen = Resolutions(app)
    headers = {**auth_headers, "Idempotency-Key": "order-17"}
    body = {"urls": ["http://example.com/once"]}
    first = await client.post(SCRAPE, json=body, headers=headers)
    again = await client.post(SCRAPE, json=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = await client.post(SCRAPE, json={"urls": ["http://example.com/x"]}, headers=headers)
    assert other.status_code == 409
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["job_id"] == first.json()["id"]
    bad = await client.post(SCRAPE, json=body, headers={**auth_headers, "Idempotency-Key": ""})
    assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["detail"]
    assert seen.count == 0  # every one answered by the middleware
    assert await count("jobs") == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"urls": ["ftp://example.com/"]}', "only http and https"),
        (b'{"urls": []}', "urls"),
        (b'{"urls": ["http://example.com/"], "nope": 1}', "nope"),
        (b'{"urls": ["http://example.com/"], "extract": {"t": {"css": "a[[["}}}', "selector"),
        (b'{"urls": ["http://example.com/"', "JSON"),
        (b"", "body"),
    ],
)
async def test_refused_bodies_get_the_apps_answer(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    warm: None,
    count: Count,
    body: bytes,
    fragment: str,
) -> None:
    """A body the model refuses goes on to the app with the bytes already read: its 422,
    the same as when the app takes the request from the start (a +json type, which the
    middleware leaves alone), nothing stored."""
    response = await client.post(
        SCRAPE, content=body, headers={**auth_headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert fragment.lower() in response.text.lower()
    routed = await client.post(
        SCRAPE, content=body, headers={**auth_headers, "Content-Type": "application/vnd.x+json"}
    )
    assert routed.status_code == 422
    assert response.json() == routed.json()
    assert await count("jobs") == 0


async def test_private_target_is_refused_on_the_fast_path(
    db_url: str, db: ConnectionManager, count: Count
) -> None:
    """With the SSRF guard on (the default), a private URL is a 422 from the middleware."""
    settings = make_settings(db_url, allow_private_networks=False)
    application = create_app(settings, migrate=False)
    headers = bearer(await make_key(db, "guarded"))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get(f"{JOBS}/{uuid.uuid4()}", headers=headers)).status_code == 404
            seen = Resolutions(application)
            refused = await client.post(
                SCRAPE, json={"urls": ["http://127.0.0.1:9/admin"]}, headers=headers
            )
            assert refused.status_code == 422, refused.text
            assert "not allowed" in refused.json()["detail"]
            assert seen.count == 0
    assert await count("jobs") == 0


@pytest.fixture
async def limited(db_url: str, db: ConnectionManager) -> AsyncIterator[tuple[FastAPI, Headers]]:
    settings = make_settings(
        db_url, tenant_submit_rate=0.1, tenant_submit_burst=2, tenant_max_active_jobs=0
    )
    application = create_app(settings, migrate=False)
    async with application.router.lifespan_context(application):
        yield application, bearer(await make_key(db, "limited", tenant="limited"))


async def test_rate_limit_on_the_fast_path(limited: tuple[FastAPI, Headers], count: Count) -> None:
    application, headers = limited
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get(f"{JOBS}/{uuid.uuid4()}", headers=headers)).status_code == 404
        seen = Resolutions(application)
        body = {"urls": ["http://example.com/r"]}
        codes = [(await client.post(SCRAPE, json=body, headers=headers)) for _ in range(3)]
    assert [r.status_code for r in codes] == [202, 202, 429]
    refused = codes[-1]
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) >= 1
    assert "rate limit" in refused.json()["detail"]
    assert seen.count == 0
    assert await count("jobs") == 2


@pytest.fixture
async def heard(db_url: str) -> AsyncIterator[asyncio.Queue[str]]:
    """Every NOTIFY trawler_tasks, as an executor's listener sees it."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(pg.asyncpg_dsn(db_url))
    await listener.add_listener(NOTIFY_TASKS, lambda _c, _p, channel, _d: queue.put_nowait(channel))
    yield queue
    await listener.close()


async def _drain(queue: asyncio.Queue[str]) -> int:
    await asyncio.sleep(0.3)  # notifications still on their way
    n = 0
    while not queue.empty():
        queue.get_nowait()
        n += 1
    return n


async def test_concurrent_submissions_share_wakeups(
    app: FastAPI,
    client: httpx.AsyncClient,
    auth_headers: Headers,
    warm: None,
    heard: asyncio.Queue[str],
) -> None:
    answers = await asyncio.gather(
        *(
            client.post(SCRAPE, json={"urls": [f"http://example.com/{n}"]}, headers=auth_headers)
            for n in range(40)
        )
    )
    assert {r.status_code for r in answers} == {202}
    waker: TaskWaker = app.state.task_waker
    await waker.settle()
    delivered = await _drain(heard)
    assert 1 <= waker.sent < 40  # coalesced: not one per submission
    assert delivered == waker.sent


async def test_a_wake_during_a_notify_in_flight_gets_one_more(
    db: ConnectionManager, heard: asyncio.Queue[str]
) -> None:
    """Whatever committed before a wake() is covered by a NOTIFY that starts after it."""
    waker = TaskWaker(db)
    waker.wake()
    await asyncio.sleep(0)  # the first NOTIFY is under way (waiting for the database)
    for _ in range(10):
        waker.wake()  # these must not be answered by the NOTIFY already sent
    await waker.settle()
    assert waker.sent == 2
    assert await _drain(heard) == 2
    waker.wake()
    await waker.settle()
    assert waker.sent == 3
    assert await _drain(heard) == 1
