"""Schedules: the API, and ticks claimed through the database by real executors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from app.scraper.ssrf import SSRFGuard
from app.services import schedules
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.support import executors as executors_support
from tests.support.jobs import scalar

Headers = dict[str, str]
TEMPLATE = {"urls": ["http://127.0.0.1:9/report"], "priority": 5}


@pytest.fixture
def settings(db_url: str) -> Settings:
    # second-granularity crons allowed, so that ticks come every second in tests
    return make_settings(db_url, schedule_min_interval_s=1, schedule_poll_interval=0.05)


async def start_executor(settings: Settings, started: list[AsyncJobExecutor]) -> AsyncJobExecutor:
    # no claiming of the submitted jobs' tasks matters here: their URL is unreachable
    return await executors_support.start_executor(settings, started, listen=False)


async def create(client: httpx.AsyncClient, headers: Headers, **body: Any) -> dict[str, Any]:
    payload = {"kind": "scrape", "template": TEMPLATE, **body}
    response = await client.post("/api/v1/schedules", json=payload, headers=headers)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def runs_of(db: ConnectionManager, schedule_id: str) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT tick, outcome, job_id, missed FROM schedule_runs "
                "WHERE schedule_id = :id ORDER BY tick"
            ),
            {"id": schedule_id},
        )
        return [dict(r._mapping) for r in rows]


async def jobs_count(db: ConnectionManager) -> int:
    return int(await scalar(db, "SELECT count(*) FROM jobs"))


async def set_next_run(db: ConnectionManager, schedule_id: str, when: datetime) -> None:
    async with db.connect() as conn:
        await conn.execute(
            text("UPDATE schedules SET next_run_at = :at WHERE id = :id"),
            {"at": when, "id": schedule_id},
        )


async def test_every_minute_schedule_runs_once_per_tick_with_two_workers(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    settings: Settings,
    executors: list[AsyncJobExecutor],
) -> None:
    # not near a minute boundary: the schedule's first real tick must not come due (and
    # be run by the workers) before the test has moved it three minutes back
    now = datetime.now(UTC)
    if now.second >= 45:
        await asyncio.sleep(61 - now.second)
    before = datetime.now(UTC)
    schedule = await create(client, auth_headers, cron="* * * * *")
    first = datetime.fromisoformat(schedule["next_run_at"])
    assert first.second == 0 and before < first <= before + timedelta(minutes=1, seconds=1)
    assert [datetime.fromisoformat(t) for t in schedule["next_runs"]] == [
        first + timedelta(minutes=n) for n in range(5)
    ]
    await start_executor(settings, executors)
    await start_executor(settings, executors)

    # the workers were down for three minutes: the three missed ticks and the current one
    # fold into a single run (the documented policy), then the schedule continues from now
    current = datetime.now(UTC).replace(second=0, microsecond=0)
    await set_next_run(db, schedule["id"], current - timedelta(minutes=3))
    # and a burst of extra claimers racing the two workers' loops for the same tick
    guard = SSRFGuard(allow_private=True)
    await asyncio.gather(*(schedules.run_due(db, settings, guard) for _ in range(8)))
    deadline = time.monotonic() + 5
    while not await runs_of(db, schedule["id"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the workers keep polling every 50 ms meanwhile

    [run] = await runs_of(db, schedule["id"])
    assert run["outcome"] == "submitted" and run["missed"] == 3
    assert run["tick"] == current
    assert await jobs_count(db) == 1
    job_id = run["job_id"]
    job = await client.get(f"/api/v1/jobs/{job_id}", headers=auth_headers)
    assert job.status_code == 200 and job.json()["priority"] == 5
    got = (await client.get(f"/api/v1/schedules/{schedule['id']}", headers=auth_headers)).json()
    assert datetime.fromisoformat(got["next_run_at"]) == current + timedelta(minutes=1)
    assert got["last_job_id"] == str(job_id)

    # the same tick claimed again (next_run_at pushed back by hand): the unique tick row
    # refuses it, no second job; the schedule just moves on
    await set_next_run(db, schedule["id"], current - timedelta(seconds=30))
    await schedules.run_due(db, settings, guard)
    if datetime.now(UTC) - current < timedelta(seconds=59):  # still the same minute
        assert len(await runs_of(db, schedule["id"])) == 1
        assert await jobs_count(db) == 1
        got = await client.get(f"/api/v1/schedules/{schedule['id']}", headers=auth_headers)
        assert datetime.fromisoformat(got.json()["next_run_at"]) == current + timedelta(minutes=1)


async def test_second_ticks_each_run_exactly_once_with_two_workers(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    settings: Settings,
    executors: list[AsyncJobExecutor],
) -> None:
    schedule = await create(client, auth_headers, cron="* * * * * *", overlap="allow")
    await start_executor(settings, executors)
    await start_executor(settings, executors)
    deadline = time.monotonic() + 10
    while len(await runs_of(db, schedule["id"])) < 3:
        assert time.monotonic() < deadline, "fewer than 3 ticks ran in 10 s"
        await asyncio.sleep(0.1)
    disabled = await client.post(
        f"/api/v1/schedules/{schedule['id']}/disable", headers=auth_headers
    )
    assert disabled.json()["enabled"] is False
    await asyncio.sleep(0.3)

    runs = await runs_of(db, schedule["id"])
    ticks = [r["tick"] for r in runs]
    assert len(ticks) == len(set(ticks)) >= 3
    assert all(t.microsecond == 0 for t in ticks)
    assert all(r["outcome"] == "submitted" for r in runs)
    assert len({r["job_id"] for r in runs}) == len(runs) == await jobs_count(db)
    ran_by = [ex.stats.schedule_ticks for ex in executors]
    assert sum(ran_by) == len(runs)


async def tick(db: ConnectionManager, settings: Settings, schedule_id: str) -> dict[str, Any]:
    """Wait for the schedule's next tick, run it through the real tick claim, return the run."""
    next_run = await scalar(db, "SELECT next_run_at FROM schedules WHERE id = :id", id=schedule_id)
    await asyncio.sleep(max(0.0, (next_run - datetime.now(UTC)).total_seconds()) + 0.02)
    assert await schedules.run_due(db, settings, SSRFGuard(allow_private=True)) >= 1
    return (await runs_of(db, schedule_id))[-1]


async def finish(db: ConnectionManager, job_id: uuid.UUID) -> None:
    async with db.connect() as conn:
        await conn.execute(
            text("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = :id"),
            {"id": job_id},
        )


async def test_overlap_policies(
    client: httpx.AsyncClient, auth_headers: Headers, db: ConnectionManager, settings: Settings
) -> None:
    # no executor runs: a submitted job stays queued, i.e. the previous run is active
    skip = await create(client, auth_headers, cron="* * * * * *", overlap="skip")
    queue = await create(client, auth_headers, cron="* * * * * *", overlap="queue")
    allow = await create(client, auth_headers, cron="* * * * * *", overlap="allow")
    for schedule in (skip, queue, allow):
        await set_next_run(db, schedule["id"], datetime.now(UTC) + timedelta(hours=1))

    async def runs(schedule: dict[str, Any], n: int) -> list[dict[str, Any]]:
        await set_next_run(db, schedule["id"], datetime.now(UTC))
        for _ in range(n):
            await tick(db, settings, schedule["id"])
        await set_next_run(db, schedule["id"], datetime.now(UTC) + timedelta(hours=1))
        return await runs_of(db, schedule["id"])

    # skip: the second tick finds the first job active
    first, second = await runs(skip, 2)
    assert (first["outcome"], second["outcome"]) == ("submitted", "skipped")
    assert second["job_id"] is None

    # allow: every tick submits
    assert [r["outcome"] for r in await runs(allow, 2)] == ["submitted", "submitted"]

    # queue: one tick waits for the active job (a third is skipped: at most one waits) and
    # is submitted as soon as that job ends
    first, waiting, third = await runs(queue, 3)
    assert [first["outcome"], waiting["outcome"], third["outcome"]] == [
        "submitted",
        "queued",
        "skipped",
    ]
    shown = (await client.get(f"/api/v1/schedules/{queue['id']}", headers=auth_headers)).json()
    assert datetime.fromisoformat(shown["pending_tick"]) == waiting["tick"]
    guard = SSRFGuard(allow_private=True)
    assert await schedules.run_due(db, settings, guard) == 0  # still active: nothing to do
    await finish(db, first["job_id"])
    assert await schedules.run_due(db, settings, guard) == 1
    runs_now = await runs_of(db, queue["id"])
    assert runs_now[1]["outcome"] == "submitted" and runs_now[1]["job_id"] is not None
    assert runs_now[1]["job_id"] != first["job_id"]
    shown = (await client.get(f"/api/v1/schedules/{queue['id']}", headers=auth_headers)).json()
    assert shown["pending_tick"] is None and shown["last_job_id"] == str(runs_now[1]["job_id"])

    # 2 (skip: 1) + 2 (allow) + 2 (queue) jobs in all
    assert await jobs_count(db) == 1 + 2 + 2
    history = await client.get(f"/api/v1/schedules/{queue['id']}/runs", headers=auth_headers)
    assert [r["outcome"] for r in history.json()["items"]] == ["skipped", "submitted", "submitted"]


async def test_schedule_api(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
) -> None:
    base = {"kind": "scrape", "template": TEMPLATE}
    bad = [
        {**base, "cron": "61 * * * *"},
        {**base, "cron": "* * *"},
        {**base, "cron": "* * * * *", "timezone": "Mars/Olympus"},
        {**base, "cron": "* * * * *", "kind": "crawl"},  # the template is no crawl
        {**base, "cron": "* * * * *", "template": {"urls": ["not a url"]}},
        {**base, "cron": "* * * * *", "overlap": "sometimes"},
        {**base, "cron": "* * * * *", "template": {**TEMPLATE, "webhook": {"url": "x"}}},
    ]
    for body in bad:
        response = await client.post("/api/v1/schedules", json=body, headers=auth_headers)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    assert await scalar(db, "SELECT count(*) FROM schedules") == 0

    schedule = await create(
        client,
        auth_headers,
        name="weekday report",
        cron="0 9 * * 1-5",
        timezone="Europe/Paris",
        template={
            **TEMPLATE,
            "webhook": {"url": "http://127.0.0.1:9/hook", "secret": "0123456789abcdef-secret"},
        },
    )
    paris = [
        datetime.fromisoformat(t).astimezone(ZoneInfo("Europe/Paris"))
        for t in schedule["next_runs"]
    ]
    assert len(paris) == 5
    assert all((t.hour, t.minute, t.weekday() < 5) == (9, 0, True) for t in paris)
    assert schedule["template"]["webhook"]["secret"] == "********"
    assert schedule["enabled"] is True and schedule["overlap"] == "skip"
    location = f"/api/v1/schedules/{schedule['id']}"

    listed = (await client.get("/api/v1/schedules", headers=auth_headers)).json()
    assert [s["id"] for s in listed["items"]] == [schedule["id"]]
    assert (await client.get("/api/v1/schedules", headers=other_headers)).json()["items"] == []
    assert (await client.get(location, headers=other_headers)).status_code == 404
    assert (await client.delete(location, headers=other_headers)).status_code == 404

    disabled = (await client.post(f"{location}/disable", headers=auth_headers)).json()
    assert disabled["enabled"] is False and disabled["next_run_at"] is None
    assert disabled["next_runs"] == []
    enabled = (await client.post(f"{location}/enable", headers=auth_headers)).json()
    assert enabled["enabled"] is True and enabled["next_run_at"] == schedule["next_runs"][0]
    assert (await client.get(f"{location}/runs", headers=auth_headers)).json()["items"] == []

    assert (await client.delete(location, headers=auth_headers)).status_code == 204
    assert (await client.get(location, headers=auth_headers)).status_code == 404
    assert (await client.post(f"{location}/enable", headers=auth_headers)).status_code == 404
    assert await scalar(db, "SELECT count(*) FROM schedules") == 0


async def test_too_frequent_schedules_are_refused(
    app_default_client: httpx.AsyncClient, auth_headers: Headers
) -> None:
    body = {"kind": "scrape", "template": TEMPLATE, "cron": "*/10 * * * * *"}
    response = await app_default_client.post("/api/v1/schedules", json=body, headers=auth_headers)
    assert response.status_code == 422
    assert "shortest interval" in response.json()["detail"]


@pytest.fixture
async def app_default_client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API with the default minimum interval between ticks (60 s)."""
    application = create_app(make_settings(db_url), migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c
