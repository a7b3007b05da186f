"""Job routes against the real database: list, get, pages, events, cancel, retry, delete, bulk."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text

from app.database.connection import ConnectionManager
from app.database.models import JobStatus
from app.services import state
from tests import pg
from tests.integration.conftest import Count, Headers, SqlRun

JOBS = "/api/v1/jobs"
SCRAPE = "/api/v1/scrape"


async def submit(
    client: httpx.AsyncClient, headers: Headers, urls: list[str], **extra: Any
) -> dict[str, Any]:
    response = await client.post(SCRAPE, json={"urls": urls, **extra}, headers=headers)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


async def settle(db: ConnectionManager, job_id: str | uuid.UUID, outcomes: dict[str, str]) -> None:
    """Give tasks (by URL) a final status and a page, recount the job, and move it through
    state.transition: running, then completed/failed once nothing is queued or leased."""
    jid = uuid.UUID(str(job_id))
    async with db.session() as session:
        conn = await session.connection()
        for url, status in outcomes.items():
            task_id = (
                await conn.execute(
                    text(
                        "WITH t AS (UPDATE tasks SET status = CAST(:st AS text), attempts = 1, "
                        "last_error = CASE WHEN CAST(:st AS text) = 'failed' "
                        "THEN 'HTTP 503' END "
                        "WHERE job_id = :id AND url = :url RETURNING id), "
                        "ended AS (DELETE FROM task_queue WHERE task_id IN (SELECT id FROM t)) "
                        "SELECT id FROM t"
                    ),
                    {"st": status, "id": jid, "url": url},
                )
            ).scalar_one()
            ok = status == "succeeded"
            await conn.execute(
                text(
                    "INSERT INTO pages (job_id, task_id, url, final_url, status_code, ok, "
                    "depth, elapsed_ms, data, error) VALUES (:id, :task, :url, :url, :code, "
                    ":ok, 0, 12, CAST(:data AS jsonb), :error)"
                ),
                {
                    "id": jid,
                    "task": task_id,
                    "url": url,
                    "code": 200 if ok else 503,
                    "ok": ok,
                    "data": '{"title": "T"}' if ok else "{}",
                    "error": None if ok else "HTTP 503",
                },
            )
        await conn.execute(
            text(
                """UPDATE jobs j SET queued = c.q, running = c.r, succeeded = c.s, failed = c.f
                   FROM (SELECT count(*) FILTER (WHERE status = 'queued'
                                                   AND q.lease_owner IS NULL) q,
                                count(*) FILTER (WHERE q.lease_owner IS NOT NULL) r,
                                count(*) FILTER (WHERE status = 'succeeded') s,
                                count(*) FILTER (WHERE status = 'failed') f
                         FROM tasks t LEFT JOIN task_queue q ON q.task_id = t.id
                         WHERE t.job_id = :id) c
                   WHERE j.id = :id"""
            ),
            {"id": jid},
        )
        await state.transition(conn, jid, JobStatus.running)
        await state.finish_if_done(conn, [jid])


async def lease_one(sql: SqlRun, job_id: str, url: str) -> None:
    """Simulate a worker's claim of one task: leased, job counters moved, job running."""
    await sql(
        "UPDATE task_queue SET lease_owner = gen_random_uuid(), attempts = 1, leased_at = now(), "
        "lease_expires_at = now() + interval '60 s' "
        "WHERE task_id = (SELECT id FROM tasks WHERE job_id = :id AND url = :url)",
        id=job_id,
        url=url,
    )
    await sql(
        "UPDATE jobs SET queued = queued - 1, running = running + 1 WHERE id = :id", id=job_id
    )


async def job_status(sql: SqlRun, job_id: str) -> str:
    rows = await sql("SELECT status FROM jobs WHERE id = :id", id=job_id)
    return str(rows[0][0])


async def task_statuses(sql: SqlRun, job_id: str) -> dict[str, str]:
    rows = await sql("SELECT url, status FROM tasks WHERE job_id = :id", id=job_id)
    return {str(url): str(status) for url, status in rows}


def urls(n: int, host: str = "a.example") -> list[str]:
    return [f"https://{host}/{i}" for i in range(n)]


# --------------------------------------------------------------------------------------
# get / list


async def test_get_job(client: httpx.AsyncClient, auth_headers: Headers) -> None:
    job = await submit(client, auth_headers, urls(2))
    response = await client.get(f"{JOBS}/{job['id']}", headers=auth_headers)
    assert response.status_code == 200
    assert response.json() == job

    missing = await client.get(f"{JOBS}/{uuid.uuid4()}", headers=auth_headers)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert "not found" in missing.json()["detail"]
    malformed = await client.get(f"{JOBS}/not-a-uuid", headers=auth_headers)
    assert malformed.status_code == 422


async def _all_pages(
    client: httpx.AsyncClient, headers: Headers, params: dict[str, Any]
) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(JOBS, params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 20, "pagination does not end"


async def test_list_filters_and_keyset_pagination(
    client: httpx.AsyncClient, auth_headers: Headers, other_headers: Headers, db: ConnectionManager
) -> None:
    created = [await submit(client, auth_headers, [f"https://l.example/{i}"]) for i in range(25)]
    await submit(client, other_headers, ["https://other.example/"])  # never listed for A
    for i, job in enumerate(created[:5]):
        await settle(db, job["id"], {f"https://l.example/{i}": "succeeded"})
    for job in created[5:8]:
        cancelled = await client.post(f"{JOBS}/{job['id']}/cancel", headers=auth_headers)
        assert cancelled.status_code == 200

    newest_first = [j["id"] for j in reversed(created)]
    pages = await _all_pages(client, auth_headers, {"limit": 10})
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [j["id"] for p in pages for j in p] == newest_first

    completed = await _all_pages(client, auth_headers, {"status": "completed"})
    assert {j["id"] for j in completed[0]} == {j["id"] for j in created[:5]}
    assert all(j["status"] == "completed" for j in completed[0])
    both = await _all_pages(client, auth_headers, {"status": "completed,cancelled"})
    assert len(both[0]) == 8
    repeated = await _all_pages(
        client, auth_headers, {"status": ["completed", "cancelled"], "limit": 3}
    )
    assert [len(p) for p in repeated] == [3, 3, 2]
    queued = await _all_pages(client, auth_headers, {"status": "queued", "limit": 7})
    assert [len(p) for p in queued] == [7, 7, 3]
    assert [j["id"] for p in queued for j in p] == newest_first[:17]

    assert (await _all_pages(client, auth_headers, {"kind": "crawl"})) == [[]]
    assert len((await _all_pages(client, auth_headers, {"kind": "scrape"}))[0]) == 25

    pivot = created[10]["created_at"]
    after = await _all_pages(client, auth_headers, {"created_after": pivot})
    assert [j["id"] for j in after[0]] == newest_first[:15]
    before = await _all_pages(client, auth_headers, {"created_before": pivot, "limit": 4})
    assert [j["id"] for p in before for j in p] == newest_first[15:]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"cursor": "!!!"}, "invalid cursor"),
        ({"cursor": "WzFd"}, "invalid cursor"),  # base64url of [1]: not a job position
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"status": "sleeping"}, "unknown status"),
        ({"kind": "spider"}, "kind"),
        ({"created_after": "yesterday"}, "created_after"),
    ],
)
async def test_list_rejects_bad_parameters(
    client: httpx.AsyncClient, auth_headers: Headers, params: dict[str, Any], expected: str
) -> None:
    response = await client.get(JOBS, params=params, headers=auth_headers)
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]


# --------------------------------------------------------------------------------------
# pages


async def test_pages_with_cursor_and_status_filter(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager
) -> None:
    job = await submit(client, auth_headers, urls(5))
    outcomes = {
        "https://a.example/0": "succeeded",
        "https://a.example/1": "failed",
        "https://a.example/2": "succeeded",
        "https://a.example/3": "failed",
        "https://a.example/4": "succeeded",
    }
    await settle(db, job["id"], outcomes)

    seen: list[dict[str, Any]] = []
    cursor = None
    sizes = []
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await client.get(
            f"{JOBS}/{job['id']}/pages", params=params, headers=auth_headers
        )
        assert response.status_code == 200, response.text
        body = response.json()
        sizes.append(len(body["items"]))
        seen.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sizes == [2, 2, 1]
    assert [p["url"] for p in seen] == list(outcomes)  # fetch (id) order
    assert set(seen[0]) == {
        "url",
        "final_url",
        "status_code",
        "ok",
        "depth",
        "fetched_at",
        "elapsed_ms",
        "data",
        "error",
    }
    assert seen[0]["data"] == {"title": "T"} and seen[0]["ok"] is True
    assert seen[1]["error"] == "HTTP 503" and seen[1]["status_code"] == 503

    ok = await client.get(f"{JOBS}/{job['id']}/pages?status=ok", headers=auth_headers)
    assert [p["url"] for p in ok.json()["items"]] == [
        "https://a.example/0",
        "https://a.example/2",
        "https://a.example/4",
    ]
    errors = await client.get(f"{JOBS}/{job['id']}/pages?status=error", headers=auth_headers)
    assert all(p["ok"] is False for p in errors.json()["items"])
    assert len(errors.json()["items"]) == 2
    bad = await client.get(f"{JOBS}/{job['id']}/pages?status=maybe", headers=auth_headers)
    assert bad.status_code == 422

    empty = await submit(client, auth_headers, ["https://b.example/"])
    none_yet = await client.get(f"{JOBS}/{empty['id']}/pages", headers=auth_headers)
    assert none_yet.json() == {"items": [], "next_cursor": None}
    unknown = await client.get(f"{JOBS}/{uuid.uuid4()}/pages", headers=auth_headers)
    assert unknown.status_code == 404


# --------------------------------------------------------------------------------------
# cancel


@pytest.fixture
async def job_notifications(db_url: str) -> Any:
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    conn = await asyncpg.connect(pg.asyncpg_dsn(db_url))

    def on_notify(_c: object, _pid: int, channel: str, payload: str) -> None:
        queue.put_nowait((channel, payload))

    await conn.add_listener("trawler_jobs", on_notify)
    await conn.add_listener("trawler_tasks", on_notify)
    yield queue
    await conn.close()


async def next_on(queue: asyncio.Queue[tuple[str, str]], channel: str) -> str:
    while True:
        got, payload = await asyncio.wait_for(queue.get(), timeout=5)
        if got == channel:
            return payload


async def notified(queue: asyncio.Queue[tuple[str, str]], channel: str, expected: str) -> None:
    """Until `expected` arrives on `channel` (within 5 s each). Notifications of earlier
    transitions may still be on their way when a test drains the queue: they are passed."""
    seen = []
    while (payload := await next_on(queue, channel)) != expected:
        seen.append(payload)
        assert len(seen) < 10, f"{expected} not among {seen}"


async def test_cancel_cancels_queued_and_leased_tasks_and_notifies(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    sql: SqlRun,
    db: ConnectionManager,
    job_notifications: asyncio.Queue[tuple[str, str]],
) -> None:
    job = await submit(client, auth_headers, urls(4))
    await settle(db, job["id"], {"https://a.example/0": "succeeded"})
    await lease_one(sql, job["id"], "https://a.example/1")
    assert await job_status(sql, job["id"]) == "running"
    while not job_notifications.empty():
        job_notifications.get_nowait()

    response = await client.post(f"{JOBS}/{job['id']}/cancel", headers=auth_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["finished_at"] is not None
    assert body["progress"] == {"total": 4, "queued": 0, "running": 0, "succeeded": 1, "failed": 0}
    assert await task_statuses(sql, job["id"]) == {
        "https://a.example/0": "succeeded",
        "https://a.example/1": "cancelled",
        "https://a.example/2": "cancelled",
        "https://a.example/3": "cancelled",
    }
    leases = await sql("SELECT count(*) FROM task_queue WHERE job_id = :id", id=job["id"])
    assert leases[0][0] == 0
    events = await sql("SELECT status FROM job_events WHERE job_id = :id ORDER BY id", id=job["id"])
    assert [e[0] for e in events][-1] == "cancelled"
    # executors abort in-flight fetches on this notification
    await notified(job_notifications, "trawler_jobs", f"{job['id']}:cancelled")

    again = await client.post(f"{JOBS}/{job['id']}/cancel", headers=auth_headers)
    assert again.status_code == 200
    assert again.json() == body  # unchanged, finished_at included


async def test_cancel_is_409_once_completed_or_failed(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager, sql: SqlRun
) -> None:
    done = await submit(client, auth_headers, ["https://a.example/0"])
    await settle(db, done["id"], {"https://a.example/0": "succeeded"})
    failed = await submit(client, auth_headers, ["https://a.example/1"])
    await settle(db, failed["id"], {"https://a.example/1": "failed"})
    for job, status in ((done, "completed"), (failed, "failed")):
        response = await client.post(f"{JOBS}/{job['id']}/cancel", headers=auth_headers)
        assert response.status_code == 409, response.text
        assert status in response.json()["detail"]
        assert await job_status(sql, job["id"]) == status
    missing = await client.post(f"{JOBS}/{uuid.uuid4()}/cancel", headers=auth_headers)
    assert missing.status_code == 404


# --------------------------------------------------------------------------------------
# retry


async def test_retry_requeues_only_failed_tasks(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    sql: SqlRun,
    count: Count,
    job_notifications: asyncio.Queue[tuple[str, str]],
) -> None:
    job = await submit(client, auth_headers, urls(4))
    await settle(
        db,
        job["id"],
        {
            "https://a.example/0": "succeeded",
            "https://a.example/1": "failed",
            "https://a.example/2": "failed",
            "https://a.example/3": "succeeded",
        },
    )
    assert await job_status(sql, job["id"]) == "completed"
    assert await count("pages") == 4
    while not job_notifications.empty():
        job_notifications.get_nowait()

    response = await client.post(f"{JOBS}/{job['id']}/retry", headers=auth_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["finished_at"] is None
    assert body["progress"] == {"total": 4, "queued": 2, "running": 0, "succeeded": 2, "failed": 0}
    rows = await sql(
        "SELECT url, status, attempts, last_error, next_attempt_at <= now() FROM tasks "
        "WHERE job_id = :id ORDER BY url",
        id=job["id"],
    )
    assert [tuple(r) for r in rows] == [
        ("https://a.example/0", "succeeded", 1, None, True),
        ("https://a.example/1", "queued", 0, None, True),
        ("https://a.example/2", "queued", 0, None, True),
        ("https://a.example/3", "succeeded", 1, None, True),
    ]
    kept = await sql("SELECT url FROM pages WHERE job_id = :id ORDER BY url", id=job["id"])
    assert [r[0] for r in kept] == ["https://a.example/0", "https://a.example/3"]
    await notified(job_notifications, "trawler_jobs", f"{job['id']}:queued")
    await next_on(job_notifications, "trawler_tasks")  # the executors' wake-up

    # now it is queued: a second retry is a conflict
    running = await client.post(f"{JOBS}/{job['id']}/retry", headers=auth_headers)
    assert running.status_code == 409
    assert "queued" in running.json()["detail"]


async def test_retry_conflicts(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager, sql: SqlRun
) -> None:
    running = await submit(client, auth_headers, urls(2))
    await settle(db, running["id"], {"https://a.example/0": "failed"})
    assert await job_status(sql, running["id"]) == "running"
    response = await client.post(f"{JOBS}/{running['id']}/retry", headers=auth_headers)
    assert response.status_code == 409
    assert "running" in response.json()["detail"]
    assert (await task_statuses(sql, running["id"]))["https://a.example/0"] == "failed"

    clean = await submit(client, auth_headers, ["https://b.example/"])
    await settle(db, clean["id"], {"https://b.example/": "succeeded"})
    response = await client.post(f"{JOBS}/{clean['id']}/retry", headers=auth_headers)
    assert response.status_code == 409
    assert "no failed tasks" in response.json()["detail"]
    assert await job_status(sql, clean["id"]) == "completed"


# --------------------------------------------------------------------------------------
# delete


async def test_delete_removes_the_job_and_every_row_of_it(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    sql: SqlRun,
    count: Count,
) -> None:
    keep = await submit(client, auth_headers, urls(3, "keep.example"))
    gone = await submit(client, auth_headers, urls(3))
    await settle(
        db,
        gone["id"],
        {"https://a.example/0": "succeeded", "https://a.example/1": "failed"},
    )
    await client.post(f"{JOBS}/{gone['id']}/cancel", headers=auth_headers)
    tables = ("jobs", "tasks", "task_queue", "pages", "job_events")
    before = {t: await count(t) for t in tables}
    assert before["pages"] == 2 and before["job_events"] >= 2

    response = await client.delete(f"{JOBS}/{gone['id']}", headers=auth_headers)
    assert response.status_code == 204
    assert response.content == b""
    for table in tables:
        column = "id" if table == "jobs" else "job_id"
        left = await sql(f"SELECT count(*) FROM {table} WHERE {column} = :id", id=gone["id"])
        assert left[0][0] == 0, f"{table} still has rows of the deleted job"
    after = {t: await count(t) for t in tables}
    assert after == {"jobs": 1, "tasks": 3, "task_queue": 3, "pages": 0, "job_events": 0}
    assert (await client.get(f"{JOBS}/{keep['id']}", headers=auth_headers)).status_code == 200
    assert (await client.get(f"{JOBS}/{gone['id']}", headers=auth_headers)).status_code == 404
    again = await client.delete(f"{JOBS}/{gone['id']}", headers=auth_headers)
    assert again.status_code == 404


async def test_delete_is_409_while_queued_or_running(
    client: httpx.AsyncClient, auth_headers: Headers, sql: SqlRun, count: Count
) -> None:
    queued = await submit(client, auth_headers, urls(2))
    running = await submit(client, auth_headers, urls(2, "b.example"))
    await lease_one(sql, running["id"], "https://b.example/0")
    await sql("UPDATE jobs SET status = 'running' WHERE id = :id", id=running["id"])
    for job in (queued, running):
        response = await client.delete(f"{JOBS}/{job['id']}", headers=auth_headers)
        assert response.status_code == 409
        assert "cancel it" in response.json()["detail"]
    assert await count("jobs") == 2 and await count("tasks") == 4


# --------------------------------------------------------------------------------------
# bulk


async def test_bulk_outcomes_per_id(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
    sql: SqlRun,
) -> None:
    queued = await submit(client, auth_headers, urls(2))
    completed = await submit(client, auth_headers, ["https://c.example/"])
    await settle(db, completed["id"], {"https://c.example/": "succeeded"})
    foreign = await submit(client, other_headers, ["https://x.example/"])
    unknown = str(uuid.uuid4())

    ids = [queued["id"], completed["id"], foreign["id"], unknown, queued["id"]]
    response = await client.post(
        f"{JOBS}/bulk", json={"action": "cancel", "ids": ids}, headers=auth_headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["action"] == "cancel"
    outcomes = {r["id"]: (r["outcome"], r["status"]) for r in body["results"]}
    assert len(body["results"]) == 4  # duplicates collapse
    assert outcomes == {
        queued["id"]: ("ok", "cancelled"),
        completed["id"]: ("conflict", None),
        foreign["id"]: ("not_found", None),
        unknown: ("not_found", None),
    }
    assert body["counts"] == {"ok": 1, "not_found": 2, "conflict": 1}
    conflict = next(r for r in body["results"] if r["outcome"] == "conflict")
    assert "completed" in conflict["detail"]
    assert await job_status(sql, foreign["id"]) == "queued"

    failed = await submit(client, auth_headers, ["https://f.example/"])
    await settle(db, failed["id"], {"https://f.example/": "failed"})
    retry = await client.post(
        f"{JOBS}/bulk",
        json={"action": "retry", "ids": [failed["id"], completed["id"]]},
        headers=auth_headers,
    )
    assert [(r["outcome"], r["status"]) for r in retry.json()["results"]] == [
        ("ok", "queued"),
        ("conflict", None),
    ]

    delete = await client.post(
        f"{JOBS}/bulk",
        json={"action": "delete", "ids": [queued["id"], completed["id"], failed["id"]]},
        headers=auth_headers,
    )
    assert [r["outcome"] for r in delete.json()["results"]] == ["ok", "ok", "conflict"]
    left = await sql("SELECT id::text FROM jobs ORDER BY created_at")
    assert sorted(r[0] for r in left) == sorted([foreign["id"], failed["id"]])


@pytest.mark.parametrize(
    "body",
    [
        {"action": "pause", "ids": [str(uuid.uuid4())]},
        {"action": "cancel", "ids": []},
        {"action": "cancel", "ids": ["nope"]},
        {"action": "cancel", "ids": [str(uuid.uuid4()) for _ in range(1001)]},
    ],
)
async def test_bulk_rejects_bad_requests(
    client: httpx.AsyncClient, auth_headers: Headers, body: dict[str, Any]
) -> None:
    response = await client.post(f"{JOBS}/bulk", json=body, headers=auth_headers)
    assert response.status_code == 422


# --------------------------------------------------------------------------------------
# auth and tenancy


async def test_job_routes_need_a_key(client: httpx.AsyncClient) -> None:
    some = uuid.uuid4()
    calls = [
        ("GET", JOBS, None),
        ("GET", f"{JOBS}/{some}", None),
        ("GET", f"{JOBS}/{some}/pages", None),
        ("GET", f"{JOBS}/{some}/events", None),
        ("POST", f"{JOBS}/{some}/cancel", None),
        ("POST", f"{JOBS}/{some}/retry", None),
        ("DELETE", f"{JOBS}/{some}", None),
        ("POST", f"{JOBS}/bulk", {"action": "cancel", "ids": [str(some)]}),
    ]
    for method, url, body in calls:
        for headers in ({}, {"Authorization": "Bearer trw_00000000_" + "0" * 40}):
            response = await client.request(method, url, json=body, headers=headers)
            assert response.status_code == 401, (method, url, response.text)


async def test_another_tenant_gets_404_on_every_route(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
    sql: SqlRun,
) -> None:
    job = await submit(client, auth_headers, urls(2))
    finished = await submit(client, auth_headers, ["https://f.example/"])
    await settle(db, finished["id"], {"https://f.example/": "failed"})
    for method, url in [
        ("GET", f"{JOBS}/{job['id']}"),
        ("GET", f"{JOBS}/{job['id']}/pages"),
        ("GET", f"{JOBS}/{job['id']}/events"),
        ("POST", f"{JOBS}/{job['id']}/cancel"),
        ("POST", f"{JOBS}/{finished['id']}/retry"),
        ("DELETE", f"{JOBS}/{finished['id']}"),
    ]:
        response = await client.request(method, url, headers=other_headers)
        assert response.status_code == 404, (method, url, response.text)
    listed = await client.get(JOBS, headers=other_headers)
    assert listed.json()["items"] == []
    assert await job_status(sql, job["id"]) == "queued"
    assert await job_status(sql, finished["id"]) == "failed"


async def test_keys_of_one_tenant_share_its_jobs(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager
) -> None:
    from tests.integration.conftest import bearer, make_key

    colleague = bearer(await make_key(db, "ci-bot", tenant="tenant-a"))
    job = await submit(client, auth_headers, urls(1))
    response = await client.get(f"{JOBS}/{job['id']}", headers=colleague)
    assert response.status_code == 200


# --------------------------------------------------------------------------------------
# SSE


def parse_sse(body: str) -> list[tuple[str, str]]:
    """(event, data) pairs; comment lines (heartbeats) are skipped."""
    events = []
    for block in body.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if fields:
            events.append((fields.get("event", "message"), fields.get("data", "")))
    return events


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def transition(db: ConnectionManager, job_id: str, to: JobStatus) -> None:
    async with db.session() as session:
        moved = await state.transition(session, uuid.UUID(job_id), to)
        assert moved


async def test_events_stream_progress_and_status_until_terminal(
    app: FastAPI,
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    sql: SqlRun,
) -> None:
    import orjson

    job = await submit(client, auth_headers, urls(2))
    stream = asyncio.create_task(client.get(f"{JOBS}/{job['id']}/events", headers=auth_headers))
    await wait_for(lambda: getattr(app.state, "job_events", None) is not None)
    await wait_for(lambda: app.state.job_events.watchers == 1)
    # the stream holds no pooled connection between its (short) reads
    await wait_for(lambda: app.state.db.pool_status()["checked_out"] == 0, timeout=2)

    await lease_one(sql, job["id"], "https://a.example/0")  # counters move, no NOTIFY
    await asyncio.sleep(1.5)  # the once-a-second poll reports it
    await transition(db, job["id"], JobStatus.running)
    await asyncio.sleep(0.5)
    await transition(db, job["id"], JobStatus.completed)

    response = await asyncio.wait_for(stream, timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [(name, orjson.loads(data)) for name, data in parse_sse(response.text)]
    assert events[0][0] == "progress"
    assert events[0][1]["progress"]["queued"] == 2
    assert any(name == "progress" and data["progress"]["running"] == 1 for name, data in events), (
        events
    )
    statuses = [data["status"] for name, data in events if name == "status"]
    assert statuses == ["running", "completed"]
    assert events[-1][0] == "status"
    assert set(events[-1][1]) >= {"id", "kind", "status", "progress", "spec"}
    await wait_for(lambda: app.state.job_events.watchers == 0)


async def test_events_of_a_finished_job_end_at_once(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager
) -> None:
    job = await submit(client, auth_headers, ["https://a.example/0"])
    await settle(db, job["id"], {"https://a.example/0": "succeeded"})
    response = await asyncio.wait_for(
        client.get(f"{JOBS}/{job['id']}/events", headers=auth_headers), timeout=3
    )
    assert [name for name, _ in parse_sse(response.text)] == ["progress", "status"]
    assert '"status":"completed"' in response.text


async def test_job_event_hub_wakes_watchers_on_notify(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager
) -> None:
    """The LISTEN path itself (no polling involved): a committed transition wakes it."""
    from app.api.resources import get_job_events

    job = await submit(client, auth_headers, urls(1))
    hub = get_job_events(app)
    await asyncio.wait_for(hub.listener.connected.wait(), timeout=5)
    other = uuid.uuid4()
    with hub.watch(uuid.UUID(job["id"])) as wake, hub.watch(other) as unrelated:
        started = time.monotonic()
        await transition(db, job["id"], JobStatus.cancelled)
        await asyncio.wait_for(wake.wait(), timeout=2)
        assert time.monotonic() - started < 1.0
        assert not unrelated.is_set()
    assert hub.watchers == 0


async def test_events_stream_ends_when_the_client_disconnects(
    app: FastAPI, auth_headers: Headers
) -> None:
    """Over a real socket: closing the connection ends the stream and its subscription."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", ws="none", http="h11", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            job = await submit(http, auth_headers, urls(1))
            async with http.stream(
                "GET", f"{JOBS}/{job['id']}/events", headers=auth_headers
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_text():
                    if "event: progress" in chunk:
                        break
                assert app.state.job_events.watchers == 1
        await wait_for(lambda: app.state.job_events.watchers == 0, timeout=3)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=5)
        sock.close()


async def test_event_stream_heartbeats_while_idle(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager
) -> None:
    from app.api.resources import get_job_events
    from app.services import events

    job = await submit(client, auth_headers, urls(1))

    async def connected() -> bool:
        return False

    chunks: list[bytes] = []
    stream = events.job_stream(
        db,
        get_job_events(app),
        "tenant-a",
        uuid.UUID(job["id"]),
        is_disconnected=connected,
        poll_s=0.05,
        heartbeat_s=0.3,
    )
    async with asyncio.timeout(5):
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.startswith(b":") and len(chunks) == 2:
                await transition(db, job["id"], JobStatus.cancelled)
    assert chunks[0].startswith(b"event: progress\n")
    assert chunks[1] == b": heartbeat\n\n"
    assert chunks[-1].startswith(b"event: status\n")
    assert b'"status":"cancelled"' in chunks[-1]


async def test_openapi_documents_the_job_routes(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/events"} <= set(paths)
    assert "/api/v1/scrape" in paths and "/api/v1/scrape/preview" in paths
