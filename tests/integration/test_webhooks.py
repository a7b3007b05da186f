"""Webhooks end to end: the API, the outbox, real executors and a real local receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.models import JobStatus
from app.services import state
from app.services.webhooks import verify_signature
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.support.executors import start_executor
from tests.support.jobs import create_job, scalar, wait_terminal
from tests.support.site import LocalSite
from tests.support.webhook_receiver import WebhookReceiver

Headers = dict[str, str]
SECRET = "whsec-test-0123456789abcdef"
TITLE = {"title": {"css": "h1", "value": "text"}}


def fast(db_url: str, **overrides: Any) -> Settings:
    """Retries in tenths of a second instead of minutes, polls every 0.1 s."""
    values: dict[str, Any] = {
        "webhook_retry_base_s": 0.2,
        "webhook_retry_max_s": 1.0,
        "webhook_poll_interval": 0.1,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        "worker_concurrency": 8,
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    return make_settings(db_url, **values)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return fast(db_url)


@pytest.fixture
async def site() -> AsyncIterator[LocalSite]:
    async with LocalSite().serve() as s:
        yield s


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver().serve() as r:
        yield r


async def submit(client: httpx.AsyncClient, headers: Headers, **body: Any) -> str:
    response = await client.post("/api/v1/scrape", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def wait_outbox_drained(db: ConnectionManager, timeout: float = 20.0) -> None:
    """Until no delivery is pending (every outcome recorded)."""
    deadline = time.monotonic() + timeout
    while await scalar(db, "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"):
        assert time.monotonic() < deadline, "deliveries still pending"
        await asyncio.sleep(0.05)


async def test_signed_job_completed_reaches_a_receiver_that_failed_twice(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    site: LocalSite,
    receiver: WebhookReceiver,
    settings: Settings,
    executors: list[AsyncJobExecutor],
) -> None:
    receiver.fail_first = 2
    response = await client.post(
        "/api/v1/scrape",
        json={
            "urls": [site.url("/page/1"), site.url("/page/2")],
            "extract": TITLE,
            "webhook": {
                "url": receiver.hook_url,
                "events": ["job.completed"],
                "secret": SECRET,
                "headers": {"X-Team": "crawlers"},
            },
        },
        headers=auth_headers,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    # the job resource shows where events go, never the secret or header values
    assert response.json()["spec"]["webhook"] == {
        "url": receiver.hook_url,
        "events": ["job.completed"],
    }
    assert SECRET not in response.text and "crawlers" not in response.text

    await start_executor(settings, executors)
    await receiver.wait_for(lambda r: r.accepted("job.completed"))

    attempts = receiver.received
    assert [a.answered for a in attempts] == [503, 503, 204]
    assert [a.headers["Trawler-Delivery-Attempt"] for a in attempts] == ["1", "2", "3"]
    event_ids = {a.headers["Trawler-Webhook-Id"] for a in attempts}
    assert len(event_ids) == 1
    # exponential backoff: ~0.2 s, then ~0.4 s (minus at most 20% jitter)
    first_gap, second_gap = (b.at - a.at for a, b in pairwise(attempts))
    assert first_gap >= 0.15 and second_gap >= 0.3, (first_gap, second_gap)

    final = attempts[-1]
    signature = final.headers["Trawler-Signature"]
    assert verify_signature(SECRET, signature, final.body)
    # the documented recipe, by hand: HMAC-SHA256(secret, "<t>.<body>") in hex
    timestamp = int(signature.split(",")[0].removeprefix("t="))
    mac = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + final.body, hashlib.sha256)
    assert signature == f"t={timestamp},v1={mac.hexdigest()}"
    assert abs(time.time() - timestamp) < 30
    # a wrong secret, a tampered body and a replay after the tolerance all fail
    assert not verify_signature("another-secret-0123456789", signature, final.body)
    assert not verify_signature(SECRET, signature, final.body.replace(b"completed", b"failed"))
    assert not verify_signature(SECRET, signature, final.body, now=timestamp + 301)

    body = final.json
    assert body["id"] == event_ids.pop()
    assert body["event"] == "job.completed" and final.event == "job.completed"
    job = body["job"]
    assert job["id"] == job_id and job["status"] == "completed" and job["kind"] == "scrape"
    assert job["progress"] == {"total": 2, "queued": 0, "running": 0, "succeeded": 2, "failed": 0}
    assert job["finished_at"].endswith("Z") and job["error"] is None
    assert final.headers["X-Team"] == "crawlers"
    assert final.headers["Content-Type"] == "application/json"

    await wait_outbox_drained(db)
    log = await client.get(f"/api/v1/jobs/{job_id}/webhooks", headers=auth_headers)
    assert log.status_code == 200
    assert log.json()["webhook"] == {
        "url": receiver.hook_url,
        "events": ["job.completed"],
        "headers": ["X-Team"],
        "signed": True,
    }
    [delivery] = log.json()["items"]
    assert delivery["event"] == "job.completed" and delivery["status"] == "delivered"
    assert delivery["attempts"] == 3 and delivery["last_status_code"] == 204
    assert delivery["event_id"] == body["id"] and delivery["delivered_at"] is not None
    assert delivery["next_attempt_at"] is None


async def test_outbox_row_commits_and_rolls_back_with_the_status_change(
    db: ConnectionManager,
) -> None:
    job_id = await create_job(db, ["http://127.0.0.1:9/x"])
    async with db.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO job_webhooks (job_id, url, events) "
                "VALUES (:id, 'http://127.0.0.1:9/hook', ARRAY['job.started', 'job.failed'])"
            ),
            {"id": job_id},
        )
    count = "SELECT count(*) FROM webhook_deliveries WHERE job_id = :id"

    async with db.engine.connect() as conn:
        transaction = await conn.begin()
        assert await state.transition(conn, job_id, JobStatus.running) == [job_id]
        assert (await conn.execute(text(count), {"id": job_id})).scalar_one() == 1
        await transaction.rollback()
    assert await scalar(db, count, id=job_id) == 0
    assert await scalar(db, "SELECT status FROM jobs WHERE id = :id", id=job_id) == "queued"

    async with db.connect() as conn:
        await state.transition(conn, job_id, JobStatus.running)
        await state.transition(conn, job_id, JobStatus.completed)  # not subscribed
    async with db.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT event, payload FROM webhook_deliveries WHERE job_id = :id"),
                {"id": job_id},
            )
        ).all()
    assert [(event, payload["job"]["status"]) for event, payload in rows] == [
        ("job.started", "running")
    ]
    assert rows[0][1]["job"]["started_at"].endswith("Z")


async def test_one_terminal_event_per_job_and_page_events_only_when_asked(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
    site: LocalSite,
    receiver: WebhookReceiver,
    settings: Settings,
    executors: list[AsyncJobExecutor],
) -> None:
    every_event = ["job.started", "job.page", "job.completed", "job.failed", "job.cancelled"]
    completed = await submit(
        client,
        auth_headers,
        urls=[site.url(f"/page/{n}") for n in range(3)],
        extract=TITLE,
        webhook={"url": receiver.hook_url, "events": every_event},
    )
    failed = await submit(
        client,
        auth_headers,
        urls=[site.url("/missing")],
        max_attempts=1,
        webhook={"url": receiver.hook_url},  # default events: no job.page
    )
    await start_executor(settings, executors)
    for job_id in (completed, failed):
        await wait_terminal(db, uuid.UUID(job_id))

    # a job cancelled while its fetches are in flight: one job.cancelled, no page failures
    cancelled = await submit(
        client,
        auth_headers,
        urls=[site.url(f"/slow?n={n}") for n in range(4)],
        webhook={"url": receiver.hook_url, "events": every_event},
    )
    deadline = time.monotonic() + 10
    while site.hits["/slow"] < 4:
        assert time.monotonic() < deadline, "the slow fetches did not start"
        await asyncio.sleep(0.05)
    response = await client.post(f"/api/v1/jobs/{cancelled}/cancel", headers=auth_headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    # cancelling again changes nothing and announces nothing
    await client.post(f"/api/v1/jobs/{cancelled}/cancel", headers=auth_headers)

    await receiver.wait_for(lambda r: len(r.accepted()) >= 9)
    await wait_outbox_drained(db)
    await asyncio.sleep(0.5)  # anything sent twice would arrive meanwhile

    events: dict[str, Counter[str]] = {}
    for received in receiver.received:
        assert received.answered == 204
        events.setdefault(received.json["job"]["id"], Counter())[received.event] += 1
    assert events[completed] == Counter({"job.started": 1, "job.page": 3, "job.completed": 1}), (
        events[completed]
    )
    assert events[failed] == Counter({"job.started": 1, "job.failed": 1})
    assert events[cancelled] == Counter({"job.started": 1, "job.cancelled": 1})

    pages = [r.json for r in receiver.received if r.event == "job.page"]
    assert sorted(p["page"]["data"]["title"] for p in pages) == [
        "Product 0",
        "Product 1",
        "Product 2",
    ]
    assert all(p["page"]["ok"] and p["page"]["status_code"] == 200 for p in pages)
    terminal = {
        r.json["job"]["id"]: r.json["job"]["status"]
        for r in receiver.received
        if r.event in ("job.completed", "job.failed", "job.cancelled")
    }
    assert terminal == {completed: "completed", failed: "failed", cancelled: "cancelled"}


async def test_webhook_input_is_validated_and_private_receivers_refused(
    client: httpx.AsyncClient,
    guarded_client: httpx.AsyncClient,
    auth_headers: Headers,
    db: ConnectionManager,
) -> None:
    target = {"urls": ["https://example.com/"]}
    bad_hooks = [
        {"url": "ftp://example.com/hook"},
        {"url": "https://example.com/hook", "events": ["job.exploded"]},
        {"url": "https://example.com/hook", "events": []},
        {"url": "https://example.com/hook", "secret": "short"},
        {"url": "https://example.com/hook", "headers": {"Trawler-Signature": "forged"}},
        {"url": "https://example.com/hook", "headers": {"X-Bad": "a\r\nb"}},
        {"url": "https://example.com/hook", "surprise": True},
    ]
    for hook in bad_hooks:
        response = await client.post(
            "/api/v1/scrape", json={**target, "webhook": hook}, headers=auth_headers
        )
        assert response.status_code == 422, (hook, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    for retain_days in (-1, "forever"):
        response = await client.post(
            "/api/v1/scrape", json={**target, "retain_days": retain_days}, headers=auth_headers
        )
        assert response.status_code == 422, response.text

    # with the SSRF guard on (the default), a webhook to a private address is refused
    for url in ("http://127.0.0.1:9/hook", "http://10.0.0.5/hook", "http://169.254.169.254/"):
        response = await guarded_client.post(
            "/api/v1/scrape", json={**target, "webhook": {"url": url}}, headers=auth_headers
        )
        assert response.status_code == 422, response.text
        assert "webhook URL" in response.json()["detail"]
    assert await scalar(db, "SELECT count(*) FROM jobs") == 0
    assert await scalar(db, "SELECT count(*) FROM job_webhooks") == 0


async def test_delivery_time_ssrf_guard_and_redelivery(
    client: httpx.AsyncClient,
    auth_headers: Headers,
    other_headers: Headers,
    db: ConnectionManager,
    db_url: str,
    site: LocalSite,
    receiver: WebhookReceiver,
    settings: Settings,
    executors: list[AsyncJobExecutor],
) -> None:
    job_id = await submit(
        client,
        auth_headers,
        urls=[site.url("/page/1")],
        max_attempts=1,
        webhook={"url": receiver.hook_url, "events": ["job.failed"], "secret": SECRET},
    )
    # a worker with the SSRF guard on: the target is refused, the job fails, and so does
    # the delivery of job.failed to 127.0.0.1 (the guard is applied again at delivery)
    guarded = fast(db_url, allow_private_networks=False, webhook_max_attempts=1)
    worker = await start_executor(guarded, executors)
    await wait_terminal(db, uuid.UUID(job_id))
    await wait_outbox_drained(db)
    log = (await client.get(f"/api/v1/jobs/{job_id}/webhooks", headers=auth_headers)).json()
    [blocked] = log["items"]
    assert blocked["event"] == "job.failed" and blocked["status"] == "failed"
    assert blocked["attempts"] == 1 and blocked["last_error"].startswith("blocked")
    assert receiver.received == []
    await worker.stop(grace=1.0)
    await worker.db.dispose()
    executors.remove(worker)

    url = f"/api/v1/jobs/{job_id}/webhooks/{blocked['id']}/redeliver"
    response = await client.post(url, headers=auth_headers)
    assert response.status_code == 202, response.text
    again = response.json()
    assert again["status"] == "pending" and again["redelivery_of"] == blocked["id"]
    assert again["event_id"] == blocked["event_id"] and again["id"] != blocked["id"]
    # a pending delivery is retried by itself: redelivering it is a conflict
    pending_url = f"/api/v1/jobs/{job_id}/webhooks/{again['id']}/redeliver"
    assert (await client.post(pending_url, headers=auth_headers)).status_code == 409
    missing = f"/api/v1/jobs/{job_id}/webhooks/999999/redeliver"
    assert (await client.post(missing, headers=auth_headers)).status_code == 404
    assert (await client.post(url, headers=other_headers)).status_code == 404
    other_log = await client.get(f"/api/v1/jobs/{job_id}/webhooks", headers=other_headers)
    assert other_log.status_code == 404

    await start_executor(settings, executors)
    await receiver.wait_for(lambda r: r.accepted("job.failed"))
    [received] = receiver.received
    assert received.headers["Trawler-Webhook-Id"] == blocked["event_id"]
    assert verify_signature(SECRET, received.headers["Trawler-Signature"], received.body)
    assert received.json["job"]["status"] == "failed"
    await wait_outbox_drained(db)
    log = (await client.get(f"/api/v1/jobs/{job_id}/webhooks", headers=auth_headers)).json()
    assert [(d["id"], d["status"]) for d in log["items"]] == [
        (again["id"], "delivered"),
        (blocked["id"], "failed"),
    ]
