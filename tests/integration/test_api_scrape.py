"""POST /api/v1/scrape and /scrape/preview against the real database and local HTTP servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web

from app.api.deps import AdminDep
from app.database.connection import ConnectionManager
from app.services import apikeys
from tests import pg
from tests.integration.conftest import Count, Headers, SqlRun, bearer, make_key

SCRAPE = "/api/v1/scrape"
PREVIEW = "/api/v1/scrape/preview"
JOB_KEYS = {
    "id",
    "kind",
    "status",
    "priority",
    "created_at",
    "started_at",
    "finished_at",
    "progress",
    "error",
    "spec",
}
EXTRACT = {
    "title": {"css": "h1", "value": "text"},
    "price": {"css": ".price", "value": "text"},
    "links": {"xpath": "//a", "value": "attr:href", "all": True},
}


@pytest.fixture
async def notifications(db_url: str) -> AsyncIterator[asyncio.Queue[tuple[str, str]]]:
    """(channel, payload) of every NOTIFY on the trawler channels, as a listener sees them."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    conn = await asyncpg.connect(pg.asyncpg_dsn(db_url))

    def on_notify(_c: object, _pid: int, channel: str, payload: str) -> None:
        queue.put_nowait((channel, payload))

    await conn.add_listener("trawler_tasks", on_notify)
    await conn.add_listener("trawler_jobs", on_notify)
    try:
        yield queue
    finally:
        await conn.close()


async def _row_counts(count: Count) -> tuple[int, int]:
    return await count("jobs"), await count("tasks")


# --------------------------------------------------------------------------------------
# Submission


async def test_submit_answers_202_with_location_and_commits_job_and_tasks(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    count: Count,
    sql: SqlRun,
    notifications: asyncio.Queue[tuple[str, str]],
) -> None:
    body = {
        "urls": [
            "https://shop.example/p/1",
            "https://SHOP.example:443/p/1#reviews",  # the same page once canonicalized
            "https://shop.example/p/2",
        ],
        "extract": EXTRACT,
        "priority": 7,
        "max_attempts": 5,
        "options": {"timeout_s": 12, "headers": {"X-Trace": "abc"}, "user_agent": "UA/1"},
    }
    response = await client.post(SCRAPE, json=body, headers=auth_headers)

    assert response.status_code == 202, response.text
    job = response.json()
    assert set(job) == JOB_KEYS
    assert response.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["kind"] == "scrape"
    assert job["status"] == "queued"
    assert job["priority"] == 7
    assert job["started_at"] is None and job["finished_at"] is None and job["error"] is None
    assert job["progress"] == {"total": 2, "queued": 2, "running": 0, "succeeded": 0, "failed": 0}
    assert job["spec"]["extract"]["links"]["all"] is True
    assert job["spec"]["options"]["headers"] == {"X-Trace": "abc"}
    assert job["spec"]["options"]["user_agent"] == "UA/1"
    assert job["spec"]["max_attempts"] == 5

    assert await _row_counts(count) == (1, 2)
    tasks = await sql(
        "SELECT url, priority, max_attempts, status, depth, host FROM tasks "
        "WHERE job_id = :id ORDER BY url",
        id=job["id"],
    )
    assert [tuple(t) for t in tasks] == [
        ("https://shop.example/p/1", 7, 5, "queued", 0, "shop.example"),
        ("https://shop.example/p/2", 7, 5, "queued", 0, "shop.example"),
    ]
    stored = await sql("SELECT spec, tenant, total, queued FROM jobs WHERE id = :id", id=job["id"])
    assert stored[0][0] == job["spec"]
    assert stored[0][1:] == ("tenant-a", 2, 2)
    # the executor wake-up is delivered (on commit)
    channel, _ = await asyncio.wait_for(notifications.get(), timeout=5)
    assert channel == "trawler_tasks"


async def test_submit_defaults(client: httpx.AsyncClient, auth_headers: Headers) -> None:
    response = await client.post(SCRAPE, json={"urls": ["http://a.example/"]}, headers=auth_headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["priority"] == 0
    assert job["spec"]["extract"] == {}
    assert job["spec"]["max_attempts"] == 3
    assert job["spec"]["options"] == {"timeout_s": 30, "headers": {}, "user_agent": None}


async def test_submit_accepts_10000_urls_in_one_transaction(
    client: httpx.AsyncClient, auth_headers: Headers, count: Count
) -> None:
    urls = [f"https://bulk.example/item/{i}" for i in range(10_000)]
    started = time.perf_counter()
    response = await client.post(SCRAPE, json={"urls": urls}, headers=auth_headers)
    elapsed = time.perf_counter() - started
    assert response.status_code == 202, response.text
    assert response.json()["progress"]["total"] == 10_000
    assert await _row_counts(count) == (1, 10_000)
    assert elapsed < 15, f"10,000 URLs took {elapsed:.1f}s"


def _too_many() -> dict[str, Any]:
    return {"urls": [f"https://x.example/{i}" for i in range(10_001)]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"urls": ["ftp://files.example/a"]}, "only http and https", id="non-http"),
        pytest.param({"urls": ["javascript:alert(1)"]}, "only http and https", id="js-scheme"),
        pytest.param({"urls": ["http://"]}, "no host", id="no-host"),
        pytest.param({"urls": ["http://exa mple.com:99999/"]}, "invalid URL", id="malformed"),
        pytest.param({"urls": ["not a url"]}, "invalid URL", id="not-a-url"),
        pytest.param({"urls": []}, "at least 1 item", id="empty-list"),
        pytest.param({}, "urls: Field required", id="missing-urls"),
        pytest.param(_too_many(), "at most 10000 items", id="over-10000"),
        pytest.param({"urls": ["https://a.example/" + "x" * 2048]}, "at most 2048", id="long-url"),
        pytest.param(
            {"urls": ["https://a.example/"], "extract": {"t": {"css": "h1[", "value": "text"}}},
            "invalid CSS selector",
            id="bad-css",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "extract": {"t": {"xpath": "//a[", "value": "text"}}},
            "invalid XPath selector",
            id="bad-xpath",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "extract": {"t": {"css": "h1", "value": "inner"}}},
            "value must be 'text', 'html' or 'attr:<name>'",
            id="unknown-value-kind",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "extract": {"t": {"css": "h1", "xpath": "//h1"}}},
            "exactly one of 'css'",
            id="css-and-xpath",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "extarct": {}},
            "extarct: Extra inputs are not permitted",
            id="unknown-field",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "extract": {"t": {"css": "h1", "first": True}}},
            "Extra inputs are not permitted",
            id="unknown-field-in-spec",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "priority": 101},
            "priority: Input should be less than or equal to 100",
            id="priority",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "max_attempts": 0},
            "max_attempts: Input should be greater than or equal to 1",
            id="max-attempts",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "options": {"timeout_s": 301}},
            "timeout_s",
            id="timeout",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "options": {"headers": {"X-A": "1\r\nX-B: 2"}}},
            "without CR, LF or NUL",
            id="header-injection",
        ),
        pytest.param(
            {"urls": ["https://a.example/"], "options": {"headers": {"Host": "internal"}}},
            "managed by the HTTP client",
            id="host-header",
        ),
    ],
)
async def test_bad_input_is_422_and_changes_nothing(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    count: Count,
    body: dict[str, Any],
    expected: str,
) -> None:
    response = await client.post(SCRAPE, json=body, headers=auth_headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert expected in problem["detail"], problem["detail"]
    assert await _row_counts(count) == (0, 0)


async def test_malformed_json_body_is_422(client: httpx.AsyncClient, auth_headers: Headers) -> None:
    response = await client.post(
        SCRAPE,
        content=b'{"urls": [',
        headers={**auth_headers, "content-type": "application/json"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",  # 127.0.0.1 as one number
        "http://0x7f.1/",
        "http://[::1]:8080/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://localhost:8000/",
    ],
)
async def test_ssrf_literal_targets_rejected_when_the_guard_is_on(
    guarded_client: httpx.AsyncClient, db: ConnectionManager, count: Count, url: str
) -> None:
    headers = bearer(await make_key(db, "tenant-a"))
    body = {"urls": ["https://public.example/ok", url]}
    response = await guarded_client.post(SCRAPE, json=body, headers=headers)
    assert response.status_code == 422, response.text
    assert "is not allowed" in response.json()["detail"]
    assert await _row_counts(count) == (0, 0)


async def test_guard_on_still_accepts_public_hosts(
    guarded_client: httpx.AsyncClient, db: ConnectionManager, count: Count
) -> None:
    headers = bearer(await make_key(db, "tenant-a"))
    body = {"urls": ["https://public.example/a", "http://93.184.215.14/b"]}
    response = await guarded_client.post(SCRAPE, json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert await _row_counts(count) == (1, 2)


async def test_guard_off_accepts_local_targets(
    client: httpx.AsyncClient, auth_headers: Headers
) -> None:
    body = {"urls": ["http://127.0.0.1:8080/", "http://2130706433/"]}
    response = await client.post(SCRAPE, json=body, headers=auth_headers)
    assert response.status_code == 202, response.text


# --------------------------------------------------------------------------------------
# Idempotency


async def test_idempotency_key_replays_the_same_job(
    client: httpx.AsyncClient, auth_headers: Headers, count: Count
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "order-42"}
    body = {"urls": ["https://a.example/1", "https://a.example/2"], "priority": 3}
    first = await client.post(SCRAPE, json=body, headers=headers)
    # the same request spelled differently (key order, an explicit default) is the same
    again = {
        "priority": 3,
        "max_attempts": 3,
        "urls": ["https://a.example/1", "https://a.example/2"],
    }
    second = await client.post(SCRAPE, json=again, headers=headers)

    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert second.status_code == 200, second.text
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert await _row_counts(count) == (1, 2)


async def test_idempotency_key_with_another_body_is_409(
    client: httpx.AsyncClient, auth_headers: Headers, count: Count
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "order-43"}
    first = await client.post(SCRAPE, json={"urls": ["https://a.example/1"]}, headers=headers)
    other = await client.post(SCRAPE, json={"urls": ["https://a.example/2"]}, headers=headers)
    assert first.status_code == 202
    assert other.status_code == 409, other.text
    assert other.headers["content-type"] == "application/problem+json"
    assert "different request" in other.json()["detail"]
    assert await _row_counts(count) == (1, 1)


async def test_idempotency_keys_are_per_tenant(
    client: httpx.AsyncClient, auth_headers: Headers, other_headers: Headers
) -> None:
    body = {"urls": ["https://a.example/1"]}
    a = await client.post(SCRAPE, json=body, headers={**auth_headers, "Idempotency-Key": "k"})
    b = await client.post(SCRAPE, json=body, headers={**other_headers, "Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


async def test_concurrent_identical_requests_make_one_job(
    client: httpx.AsyncClient, auth_headers: Headers, count: Count
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "race-1"}
    body = {"urls": [f"https://race.example/{i}" for i in range(50)]}
    responses = await asyncio.gather(
        *(client.post(SCRAPE, json=body, headers=headers) for _ in range(6))
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 200, 200, 200, 202], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await _row_counts(count) == (1, 50)


async def test_bad_idempotency_key_is_422(
    client: httpx.AsyncClient, auth_headers: Headers, count: Count
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "k" * 256}
    response = await client.post(SCRAPE, json={"urls": ["https://a.example/"]}, headers=headers)
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["detail"]
    assert await _row_counts(count) == (0, 0)


# --------------------------------------------------------------------------------------
# Auth


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer nonsense",
        "Bearer trw_AAAAAAAA_" + "b" * 40,  # well-formed, unknown
        "Basic dXNlcjpwYXNz",
    ],
)
async def test_scrape_needs_a_valid_key(
    client: httpx.AsyncClient, count: Count, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.post(SCRAPE, json={"urls": ["https://a.example/"]}, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert await _row_counts(count) == (0, 0)


async def test_a_wrong_secret_with_a_real_prefix_is_401(
    client: httpx.AsyncClient, api_key: str
) -> None:
    forged = api_key[: len("trw_") + 8] + "_" + "z" * 40
    assert forged != api_key
    response = await client.get("/api/v1/jobs", headers=bearer(forged))
    assert response.status_code == 401


async def test_a_revoked_key_is_refused_at_once(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers, api_key: str
) -> None:
    assert (await client.get("/api/v1/jobs", headers=auth_headers)).status_code == 200
    async with db.session() as session:
        keys = await apikeys.list_keys(session, tenant="tenant-a")
        assert len(keys) == 1
        revoked = await apikeys.revoke_key(session, keys[0].id)
        assert revoked is not None and revoked.revoked_at is not None
    response = await client.get("/api/v1/jobs", headers=auth_headers)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


# --------------------------------------------------------------------------------------
# Preview


PRODUCT_PAGE = """<!doctype html><html lang="en"><head><title>Blue Kettle</title>
<meta name="description" content="A kettle."></head>
<body><h1> Blue   Kettle </h1><span class="price">19.90</span>
<a href="/p/2">next</a><a href="https://other.example/x">out</a></body></html>"""


@pytest.fixture
async def site() -> AsyncIterator[str]:
    """A real HTTP server on loopback: /product, /slow (5 s), /missing (404)."""

    async def product(_request: web.Request) -> web.Response:
        return web.Response(text=PRODUCT_PAGE, content_type="text/html")

    async def slow(_request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late", content_type="text/html")

    async def missing(_request: web.Request) -> web.Response:
        return web.Response(status=404, text="<h1>nope</h1>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/product", product)
    app.router.add_get("/slow", slow)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site_ = web.TCPSite(runner, "127.0.0.1", 0)
    await site_.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_preview_fetches_and_extracts_inline_and_stores_nothing(
    client: httpx.AsyncClient, auth_headers: Headers, count: Count, site: str
) -> None:
    body = {"url": f"{site}/product", "extract": EXTRACT}
    response = await client.post(PREVIEW, json=body, headers=auth_headers)
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"url", "final_url", "status_code", "ok", "elapsed_ms", "data", "error"}
    assert result["ok"] is True and result["status_code"] == 200 and result["error"] is None
    assert result["final_url"] == f"{site}/product"
    assert result["data"] == {
        "title": "Blue Kettle",
        "price": "19.90",
        "links": [f"{site}/p/2", "https://other.example/x"],
    }
    assert isinstance(result["elapsed_ms"], int)
    assert await _row_counts(count) == (0, 0)


async def test_preview_without_spec_returns_builtins(
    client: httpx.AsyncClient, auth_headers: Headers, site: str
) -> None:
    response = await client.post(PREVIEW, json={"url": f"{site}/product"}, headers=auth_headers)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["title"] == "Blue Kettle"
    assert data["description"] == "A kettle."
    assert f"{site}/p/2" in data["links"]


async def test_preview_reports_http_errors_as_data(
    client: httpx.AsyncClient, auth_headers: Headers, site: str
) -> None:
    body = {"url": f"{site}/missing", "extract": {"h": {"css": "h1"}}}
    response = await client.post(PREVIEW, json=body, headers=auth_headers)
    assert response.status_code == 200, response.text
    assert response.json()["ok"] is False
    assert response.json()["status_code"] == 404


async def test_preview_is_bounded_by_its_timeout(
    client: httpx.AsyncClient, auth_headers: Headers, site: str
) -> None:
    body = {"url": f"{site}/slow", "options": {"timeout_s": 1}}
    started = time.perf_counter()
    response = await client.post(PREVIEW, json=body, headers=auth_headers)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is False
    assert "tim" in (result["error"] or "").lower()
    assert elapsed < 3, f"preview took {elapsed:.1f}s with a 1s timeout"


async def test_preview_refuses_private_targets_when_the_guard_is_on(
    guarded_client: httpx.AsyncClient, db: ConnectionManager, site: str
) -> None:
    headers = bearer(await make_key(db, "tenant-a"))
    response = await guarded_client.post(PREVIEW, json={"url": f"{site}/product"}, headers=headers)
    assert response.status_code == 422, response.text
    assert "loopback" in response.json()["detail"]


async def test_preview_rejects_bad_selectors_and_needs_auth(
    client: httpx.AsyncClient, auth_headers: Headers, site: str
) -> None:
    bad = {"url": f"{site}/product", "extract": {"t": {"css": "h1[", "value": "text"}}}
    response = await client.post(PREVIEW, json=bad, headers=auth_headers)
    assert response.status_code == 422
    assert "invalid CSS selector" in response.json()["detail"]
    anonymous = await client.post(PREVIEW, json={"url": f"{site}/product"})
    assert anonymous.status_code == 401


async def test_admin_dependency_refuses_user_keys(
    app: Any, client: httpx.AsyncClient, auth_headers: Headers, admin_headers: Headers
) -> None:
    async def whoami(principal: AdminDep) -> dict[str, str]:
        return {"tenant": principal.tenant, "role": principal.role.value}

    app.add_api_route("/api/v1/_test/admin-probe", whoami, methods=["GET"])
    user = await client.get("/api/v1/_test/admin-probe", headers=auth_headers)
    assert user.status_code == 403
    assert user.headers["content-type"] == "application/problem+json"
    admin = await client.get("/api/v1/_test/admin-probe", headers=admin_headers)
    assert admin.status_code == 200
    assert admin.json() == {"tenant": "ops", "role": "admin"}
    anonymous = await client.get("/api/v1/_test/admin-probe")
    assert anonymous.status_code == 401
