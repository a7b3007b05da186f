"""Admin routes: refused to user keys, audited; purge, pause/resume with a real executor,
drain, lease recovery, queue figures, API keys."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.database.connection import ConnectionManager
from app.logging import configure_logging
from app.main import create_app
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.integration.conftest import Count, Headers, SqlRun, bearer
from tests.integration.test_api_jobs import lease_one, settle, submit
from tests.integration.test_tenancy import served_routes
from tests.support.jobs import create_job
from tests.support.site import LocalSite

ADMIN = "/api/v1/admin"


async def audit_rows(sql: SqlRun) -> list[tuple[str, bool, str | None]]:
    rows = await sql("SELECT action, ok, target FROM admin_audit ORDER BY id")
    return [(r[0], r[1], r[2]) for r in rows]


def _fill(path: str) -> str:
    """A concrete URL: ids are random UUIDs, other path parameters 1."""
    for name in ("job_id", "worker_id", "key_id"):
        path = path.replace(f"{{{name}}}", str(uuid.uuid4()))
    return re.sub(r"\{[a-z_]+\}", "1", path)


async def test_every_admin_route_refuses_user_keys(
    app: FastAPI,
    client: httpx.AsyncClient,
    auth_headers: Headers,
    admin_headers: Headers,
    sql: SqlRun,
) -> None:
    calls = [
        (method, _fill(path))
        for method, path in served_routes(app)
        if (path.startswith(ADMIN) or path == "/metrics") and method != "HEAD"
    ]
    design = {  # DESIGN.md's admin route list, plus /metrics
        ("GET", f"{ADMIN}/workers"),
        ("POST", f"{ADMIN}/workers/{{worker_id}}/drain"),
        ("GET", f"{ADMIN}/queue"),
        ("POST", f"{ADMIN}/queue/pause"),
        ("POST", f"{ADMIN}/queue/resume"),
        ("POST", f"{ADMIN}/tasks/requeue-expired"),
        ("POST", f"{ADMIN}/jobs/purge"),
        ("GET", f"{ADMIN}/pool"),
        ("GET", f"{ADMIN}/api-keys"),
        ("POST", f"{ADMIN}/api-keys"),
        ("DELETE", f"{ADMIN}/api-keys/{{key_id}}"),
        ("GET", "/metrics"),
    }
    assert design <= set(served_routes(app))
    assert len(calls) >= len(design)
    await sql("UPDATE cluster_state SET paused = false")
    for method, url in calls:
        refused = await client.request(method, url, json={}, headers=auth_headers)
        assert refused.status_code == 403, (method, url, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"
        anonymous = await client.request(method, url, json={})
        assert anonymous.status_code == 401, (method, url, anonymous.text)
    # nothing happened on the user's behalf, and nothing was audited as done
    assert await sql("SELECT paused FROM cluster_state") == [(False,)]
    assert await audit_rows(sql) == []
    # the admin key passes the same gate on the read routes
    for method, url in calls:
        if method == "GET":
            allowed = await client.get(url, headers=admin_headers)
            assert allowed.status_code == 200, (url, allowed.text)


# --------------------------------------------------------------------------------------
# purge


@pytest.fixture
async def ops(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API with tiny purge batches, so a purge takes several committed batches."""
    application = create_app(make_settings(db_url, purge_batch_size=2), migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


async def _finished(
    client: httpx.AsyncClient, db: ConnectionManager, headers: Headers, n_pages: int, outcome: str
) -> str:
    urls = [f"https://p.example/{uuid.uuid4().hex}" for _ in range(n_pages)]
    job = await submit(client, headers, urls)
    await settle(db, job["id"], dict.fromkeys(urls, outcome))
    return str(job["id"])


async def test_purge_removes_exactly_the_finished_jobs_older_than_the_cutoff(
    ops: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    admin_headers: Headers,
    db: ConnectionManager,
    sql: SqlRun,
    count: Count,
) -> None:
    old_done = await _finished(ops, db, auth_headers, 3, "succeeded")
    old_failed = await _finished(ops, db, auth_headers, 2, "failed")
    old_cancelled = (await submit(ops, auth_headers, ["https://p.example/c"]))["id"]
    assert (await ops.post(f"/api/v1/jobs/{old_cancelled}/cancel", headers=auth_headers)).is_success
    fresh_other = await _finished(ops, db, other_headers, 2, "succeeded")  # another tenant
    fresh_own = await _finished(ops, db, auth_headers, 1, "succeeded")
    running = await submit(ops, auth_headers, ["https://p.example/r1", "https://p.example/r2"])
    await lease_one(sql, running["id"], "https://p.example/r1")
    await sql(
        "UPDATE jobs SET status = 'running', started_at = now() WHERE id = :id", id=running["id"]
    )
    queued = (await submit(ops, auth_headers, ["https://p.example/q"]))["id"]
    old = [old_done, old_failed, old_cancelled]
    # two hours ago; the running and the queued job too: created (and for the running one,
    # even a finished_at) two hours back must not make them purgeable
    await sql(
        "UPDATE jobs SET finished_at = now() - interval '2 hours', "
        "created_at = now() - interval '3 hours' WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=[*old, running["id"], queued],
    )
    before = {t: await count(t) for t in ("jobs", "tasks", "pages", "job_events")}

    # bad input changes nothing
    for body in (
        {"older_than_s": -1},
        {"older_than_s": 3600, "statuses": ["running"]},
        {"older_than_s": 3600, "statuses": []},
        {"older_than_s": "soon"},
        {"statuses": ["completed"]},
        {"older_than_s": 3600, "cascade": True},
    ):
        bad = await ops.post(f"{ADMIN}/jobs/purge", json=body, headers=admin_headers)
        assert bad.status_code == 422, (body, bad.text)
    assert {t: await count(t) for t in before} == before

    purged = await ops.post(
        f"{ADMIN}/jobs/purge", json={"older_than_s": 3600}, headers=admin_headers
    )
    assert purged.status_code == 200, purged.text
    assert purged.json() == {"deleted_jobs": 3, "deleted_pages": 5}
    left = {r[0] for r in await sql("SELECT id::text FROM jobs")}
    assert left == {fresh_other, fresh_own, running["id"], queued}
    orphans = await sql(
        "SELECT (SELECT count(*) FROM tasks WHERE job_id = ANY(CAST(:ids AS uuid[]))) + "
        "(SELECT count(*) FROM task_queue WHERE job_id = ANY(CAST(:ids AS uuid[]))) + "
        "(SELECT count(*) FROM pages WHERE job_id = ANY(CAST(:ids AS uuid[]))) + "
        "(SELECT count(*) FROM job_events WHERE job_id = ANY(CAST(:ids AS uuid[])))",
        ids=old,
    )
    assert orphans == [(0,)]
    assert await count("pages") == before["pages"] - 5
    # the survivors keep their rows
    leased = await sql("SELECT count(*) FROM tasks WHERE job_id = :id", id=running["id"])
    assert leased == [(2,)]

    # a second purge finds nothing; the fresh ones go once the cutoff passes them
    again = await ops.post(
        f"{ADMIN}/jobs/purge", json={"older_than_s": 3600}, headers=admin_headers
    )
    assert again.json() == {"deleted_jobs": 0, "deleted_pages": 0}
    only_b = await ops.post(
        f"{ADMIN}/jobs/purge",
        json={"older_than_s": 0, "statuses": ["completed"], "tenant": "tenant-b"},
        headers=admin_headers,
    )
    assert only_b.json() == {"deleted_jobs": 1, "deleted_pages": 2}
    assert {r[0] for r in await sql("SELECT id::text FROM jobs")} == {
        fresh_own,
        running["id"],
        queued,
    }
    rows = await sql(
        "SELECT action, ok, result, params FROM admin_audit WHERE action = 'jobs.purge' ORDER BY id"
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("jobs.purge", True, {"deleted_jobs": 3, "deleted_pages": 5}),
        ("jobs.purge", True, {"deleted_jobs": 0, "deleted_pages": 0}),
        ("jobs.purge", True, {"deleted_jobs": 1, "deleted_pages": 2}),
    ]
    assert rows[2][3]["tenant"] == "tenant-b"


# --------------------------------------------------------------------------------------
# pause / resume / drain with a real executor


@pytest.fixture
async def site() -> AsyncIterator[LocalSite]:
    async with LocalSite().serve() as s:
        yield s


@pytest.fixture
def worker_settings(db_url: str) -> Settings:
    # a long poll interval: only the NOTIFY sent on resume can explain a quick restart
    return make_settings(db_url, worker_concurrency=4, poll_interval=5.0, heartbeat_seconds=0.5)


@pytest.fixture
async def executor(worker_settings: Settings) -> AsyncIterator[AsyncJobExecutor]:
    db = ConnectionManager(worker_settings, application_name="trawler-worker")
    ex = AsyncJobExecutor(db, worker_settings)
    await ex.start()
    try:
        yield ex
    finally:
        await ex.stop(grace=1.0)
        await db.dispose()


async def _claimed(sql: SqlRun, job_id: uuid.UUID) -> int:
    rows = await sql(
        "SELECT count(*) FROM tasks t WHERE job_id = :id AND (status <> 'queued' OR "
        "EXISTS (SELECT 1 FROM task_queue q WHERE q.task_id = t.id AND q.lease_owner IS NOT NULL))",
        id=job_id,
    )
    return int(rows[0][0])


async def _wait(predicate: Any, timeout: float, step: float = 0.01) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(step)
    return time.monotonic() - started


async def test_pause_stops_claims_within_a_second_and_resume_restarts_them(
    client: httpx.AsyncClient,
    admin_headers: Headers,
    executor: AsyncJobExecutor,
    db: ConnectionManager,
    site: LocalSite,
    sql: SqlRun,
) -> None:
    site.delay = 0.02
    job_id = await create_job(db, [site.url(f"/page/{n}") for n in range(150)])

    async def some_done() -> bool:
        return await _claimed(sql, job_id) >= 20

    await _wait(some_done, 10)
    paused = await client.post(f"{ADMIN}/queue/pause", headers=admin_headers)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    paused_at = time.monotonic()
    await asyncio.sleep(1.0)
    at_one_second = await _claimed(sql, job_id)
    await asyncio.sleep(1.0)
    assert await _claimed(sql, job_id) == at_one_second  # nothing claimed after 1 s
    assert at_one_second < 150
    queue = (await client.get(f"{ADMIN}/queue", headers=admin_headers)).json()
    assert queue["paused"] is True and queue["by_status"]["queued"] == 150 - at_one_second
    health = (await client.get("/health")).json()
    assert health["queue"]["paused"] is True and any("paused" in p for p in health["problems"])
    again = await client.post(f"{ADMIN}/queue/pause", headers=admin_headers)
    assert again.json()["changed"] is False  # idempotent

    resumed = await client.post(f"{ADMIN}/queue/resume", headers=admin_headers)
    assert resumed.status_code == 200 and resumed.json()["paused"] is False

    async def claiming_again() -> bool:
        return await _claimed(sql, job_id) > at_one_second

    restart_s = await _wait(claiming_again, 3)
    assert restart_s < 1.0, f"claims restarted {restart_s:.2f}s after resume (poll is 5 s)"

    async def done() -> bool:
        rows = await sql("SELECT status FROM jobs WHERE id = :id", id=job_id)
        return bool(rows[0][0] == "completed")

    await _wait(done, 20, step=0.05)
    assert time.monotonic() - paused_at > 2.0
    assert [a for a, _, _ in await audit_rows(sql)] == [
        "queue.pause",
        "queue.pause",
        "queue.resume",
    ]


async def test_workers_are_listed_and_a_drained_worker_stops_claiming_and_exits(
    client: httpx.AsyncClient,
    admin_headers: Headers,
    worker_settings: Settings,
    db: ConnectionManager,
    sql: SqlRun,
) -> None:
    worker_db = ConnectionManager(worker_settings, application_name="trawler-worker")
    ex = AsyncJobExecutor(worker_db, worker_settings)
    running = asyncio.create_task(ex.run_forever())
    try:
        await _wait(lambda: _registered(sql, ex.worker_id), 5)
        listed = await client.get(f"{ADMIN}/workers", headers=admin_headers)
        assert listed.status_code == 200
        body = listed.json()
        (worker,) = [w for w in body["items"] if w["id"] == str(ex.worker_id)]
        assert worker["state"] == "running" and worker["stale"] is False
        assert worker["concurrency"] == 4 and worker["pid"] > 0 and worker["hostname"]
        assert worker["heartbeat_age_s"] < 5 and worker["in_flight"] == 0
        assert body["live"] == 1 and body["stale"] == 0

        unknown = await client.post(f"{ADMIN}/workers/{uuid.uuid4()}/drain", headers=admin_headers)
        assert unknown.status_code == 404
        drained = await client.post(f"{ADMIN}/workers/{ex.worker_id}/drain", headers=admin_headers)
        assert drained.status_code == 200 and drained.json()["state"] == "draining"
        await asyncio.wait_for(running, 5)  # noticed at a heartbeat, idle: it exits
        assert ex.crashed is None
        states = await sql("SELECT state FROM workers WHERE id = :id", id=ex.worker_id)
        assert states == [("stopped",)]
        stopped = await client.post(f"{ADMIN}/workers/{ex.worker_id}/drain", headers=admin_headers)
        assert stopped.status_code == 409
        hidden = (await client.get(f"{ADMIN}/workers", headers=admin_headers)).json()
        assert hidden["items"] == []
        shown = await client.get(
            f"{ADMIN}/workers", params={"include_stopped": "true"}, headers=admin_headers
        )
        assert [w["state"] for w in shown.json()["items"]] == ["stopped"]
    finally:
        if not running.done():
            ex.request_stop()
            await running
        await worker_db.dispose()
    assert await audit_rows(sql) == [
        ("worker.drain", False, str(uuid.UUID(unknown.json()["instance"].split("/")[-2]))),
        ("worker.drain", True, str(ex.worker_id)),
        ("worker.drain", False, str(ex.worker_id)),
    ]


async def _registered(sql: SqlRun, worker_id: uuid.UUID) -> bool:
    return bool(await sql("SELECT 1 FROM workers WHERE id = :id", id=worker_id))


# --------------------------------------------------------------------------------------
# queue figures, lease recovery, pool


async def test_queue_figures_and_requeue_of_expired_leases(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    admin_headers: Headers,
    sql: SqlRun,
) -> None:
    high = await submit(
        client, auth_headers, ["https://q.example/1", "https://q.example/2"], priority=5
    )
    low = await submit(client, auth_headers, ["https://q.example/3"])
    await lease_one(sql, high["id"], "https://q.example/1")
    # a lease that ran out (its worker crashed) and a task retried later
    await sql(
        "UPDATE task_queue SET lease_expires_at = now() - interval '1 minute' "
        "WHERE task_id = (SELECT id FROM tasks WHERE url = 'https://q.example/1')"
    )
    await sql(
        "UPDATE task_queue SET next_attempt_at = now() + interval '1 hour' "
        "WHERE task_id = (SELECT id FROM tasks WHERE url = 'https://q.example/2')"
    )
    await sql(
        "UPDATE task_queue SET next_attempt_at = now() - interval '90 seconds' "
        "WHERE task_id = (SELECT id FROM tasks WHERE url = 'https://q.example/3')"
    )
    queue = (await client.get(f"{ADMIN}/queue", headers=admin_headers)).json()
    assert queue["by_status"] == {"queued": 2, "due": 1, "delayed": 1, "leased": 1}
    assert queue["by_priority"] == [
        {"priority": 5, "queued": 1, "due": 0, "leased": 1},
        {"priority": 0, "queued": 1, "due": 1, "leased": 0},
    ]
    assert 89 <= queue["oldest_queued_age_s"] < 120
    assert queue["expired_leases"] == 1
    assert queue["jobs_by_status"]["queued"] == 2 and queue["paused"] is False

    requeued = await client.post(f"{ADMIN}/tasks/requeue-expired", headers=admin_headers)
    assert requeued.status_code == 200 and requeued.json() == {"recovered": 1}
    rows = await sql("SELECT status FROM tasks WHERE url = 'https://q.example/1'")
    assert rows == [("queued",)]
    counters = await sql("SELECT queued, running FROM jobs WHERE id = :id", id=high["id"])
    assert counters == [(2, 0)]
    assert (await client.post(f"{ADMIN}/tasks/requeue-expired", headers=admin_headers)).json() == {
        "recovered": 0
    }
    assert low["id"]
    assert [a for a, ok, _ in await audit_rows(sql) if ok] == [
        "tasks.requeue_expired",
        "tasks.requeue_expired",
    ]


async def test_pool_figures(client: httpx.AsyncClient, admin_headers: Headers) -> None:
    pool = (await client.get(f"{ADMIN}/pool", headers=admin_headers)).json()
    assert pool["application_name"] == "trawler-api"
    assert pool["size"] == 5 and pool["max_overflow"] == 5
    assert pool["checkouts"] >= 1 and pool["checked_out"] >= 0
    assert set(pool["wait_ms"]) == {"p50", "p99", "max"}


# --------------------------------------------------------------------------------------
# API keys and the audit trail


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


async def test_api_key_management_is_audited_and_logged(
    client: httpx.AsyncClient,
    admin_headers: Headers,
    sql: SqlRun,
    count: Count,
    json_log: io.StringIO,
) -> None:
    keys_before = await count("api_keys")
    for bad in ({"name": ""}, {"name": "x", "role": "root"}, {"name": "x", "extra": 1}, {}):
        refused = await client.post(f"{ADMIN}/api-keys", json=bad, headers=admin_headers)
        assert refused.status_code == 422, (bad, refused.text)
    assert await count("api_keys") == keys_before

    created = await client.post(
        f"{ADMIN}/api-keys",
        json={"name": "crawler-bot", "tenant": "acme"},
        headers={**admin_headers, "X-Request-ID": "req-create-1"},
    )
    assert created.status_code == 201, created.text
    new = created.json()
    assert new["tenant"] == "acme" and new["role"] == "user" and new["key"].startswith("trw_")
    assert created.headers["x-request-id"] == "req-create-1"
    use = await client.get("/api/v1/jobs", headers=bearer(new["key"]))
    assert use.status_code == 200

    listed = (await client.get(f"{ADMIN}/api-keys", headers=admin_headers)).json()
    mine = next(k for k in listed if k["id"] == new["id"])
    assert "key" not in mine and "key_hash" not in mine and mine["revoked_at"] is None
    assert all(set(k) == set(mine) for k in listed)

    revoked = await client.delete(f"{ADMIN}/api-keys/{new['id']}", headers=admin_headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert (await client.get("/api/v1/jobs", headers=bearer(new["key"]))).status_code == 401
    assert (
        await client.delete(f"{ADMIN}/api-keys/{uuid.uuid4()}", headers=admin_headers)
    ).status_code == 404

    # the last admin key cannot be revoked: that would lock every operator out
    (admin_id,) = [k["id"] for k in listed if k["role"] == "admin"]
    last = await client.delete(f"{ADMIN}/api-keys/{admin_id}", headers=admin_headers)
    assert last.status_code == 409
    assert (await client.get(f"{ADMIN}/pool", headers=admin_headers)).status_code == 200

    rows = await sql(
        "SELECT action, ok, target, request_id, key_id::text FROM admin_audit ORDER BY id"
    )
    assert [(r[0], r[1]) for r in rows] == [
        ("api_key.create", True),
        ("api_key.revoke", True),
        ("api_key.revoke", False),
        ("api_key.revoke", False),
    ]
    assert rows[0][3] == "req-create-1" and rows[1][2] == new["id"]
    assert {r[4] for r in rows} == {admin_id}
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    create_line = next(line for line in lines if line.get("admin_action") == "api_key.create")
    assert create_line["request_id"] == "req-create-1"
    assert create_line["actor_key_id"] == admin_id and create_line["ok"] is True
    refusals = [
        line for line in lines if line.get("admin_action") == "api_key.revoke" and not line["ok"]
    ]
    assert len(refusals) == 2 and all(line["level"] == "WARNING" for line in refusals)
