"""Scenario 9: bad input never changes state.

A battery of requests the API must refuse (401, 403, 404, 409, 422, 400, 429) across the
job, scrape/crawl/preview, schedule, webhook, admin, export and Firecrawl routes, sent
against a database holding real state: tenants with jobs in every status, pages, a
pending webhook delivery, schedules, a worker, the rate-limit state of several tenants.

Promise: each request gets its refusal, and the database is exactly as it was, checked
after every single request: every table of the schema (listed from information_schema, so
a new table is covered without touching this test) with its row count and a checksum of
all its rows. Two columns are left out, each for its reason:
- api_keys.last_used_at: authenticating a key records its use (that is what it is for);
- admin_audit: a refused admin action is put on record by design ("the attempt is on
  record", app.services.admin): the test asserts that each refused admin request adds
  exactly one row, ok = false, and that nothing else about the table changes.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.database.connection import ConnectionManager
from app.main import create_app
from tests.conftest import make_settings
from tests.integration.conftest import Headers, bearer, make_key
from tests.integration.test_api_jobs import settle
from tests.support.jobs import create_job

pytestmark = [pytest.mark.timeout(90)]

API = "/api/v1"
MAX_ACTIVE = 4  # tenant_max_active_jobs of the app under test
# columns whose change is not a change of state (see the module docstring)
VOLATILE = {("api_keys", "last_used_at")}
AUDIT = "admin_audit"
RATE = "tenant_limits"


@dataclass
class World:
    """The state the battery runs against."""

    acme: Headers = field(default_factory=dict)  # the main tenant
    other: Headers = field(default_factory=dict)  # another tenant
    admin: Headers = field(default_factory=dict)  # the only admin key
    full: Headers = field(default_factory=dict)  # at its active-jobs limit
    throttled: Headers = field(default_factory=dict)  # out of submission rate
    fresh: Headers = field(default_factory=dict)  # never used: no rate state yet
    revoked: Headers = field(default_factory=dict)
    admin_key_id: str = ""
    completed: str = ""  # completed, one page failed, a webhook delivery pending
    running: str = ""
    queued_crawl: str = ""
    cancelled: str = ""
    others_job: str = ""
    schedule: str = ""
    others_schedule: str = ""
    delivery: int = 0
    stopped_worker: str = ""


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The production defaults (SSRF guard on, submission rate 10/s, burst 100), with a
    small active-jobs limit so that 429 is reachable."""
    settings = make_settings(
        db_url, allow_private_networks=False, tenant_max_active_jobs=MAX_ACTIVE
    )
    application = create_app(settings, migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield c


async def _sql(db: ConnectionManager, statement: str, **params: Any) -> list[Any]:
    async with db.engine.begin() as conn:
        result = await conn.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


@pytest.fixture
async def world(db: ConnectionManager, client: httpx.AsyncClient) -> World:
    w = World()
    w.acme = bearer(await make_key(db, "acme"))
    w.other = bearer(await make_key(db, "other"))
    w.admin = bearer(await make_key(db, "ops", admin=True))
    w.full = bearer(await make_key(db, "full"))
    w.throttled = bearer(await make_key(db, "throttled"))
    w.fresh = bearer(await make_key(db, "fresh"))
    w.admin_key_id = str((await _sql(db, "SELECT id FROM api_keys WHERE name = 'ops'"))[0][0])

    async def submit(headers: Headers, path: str, body: dict[str, Any], **extra: str) -> str:
        response = await client.post(f"{API}{path}", json=body, headers={**headers, **extra})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    w.completed = await submit(
        w.acme,
        "/scrape",
        {
            "urls": ["https://shop.example/p/1", "https://shop.example/p/2"],
            "extract": {"title": {"css": "h1", "value": "text"}},
            "webhook": {"url": "https://hooks.example/t", "events": ["job.completed"]},
        },
        **{"Idempotency-Key": "order-1"},
    )
    await settle(
        db,
        w.completed,
        {"https://shop.example/p/1": "succeeded", "https://shop.example/p/2": "failed"},
    )
    w.delivery = int((await _sql(db, "SELECT id FROM webhook_deliveries"))[0][0])
    w.running = await submit(w.acme, "/scrape", {"urls": ["https://shop.example/p/3"]})
    await _sql(
        db,
        "UPDATE task_queue SET lease_owner = gen_random_uuid(), attempts = 1, leased_at = now(), "
        "lease_expires_at = now() + interval '1 hour' WHERE job_id = :id",
        id=w.running,
    )
    await _sql(
        db,
        "UPDATE jobs SET status = 'running', started_at = now(), queued = 0, running = 1 "
        "WHERE id = :id",
        id=w.running,
    )
    w.queued_crawl = await submit(w.acme, "/crawl", {"seeds": ["https://shop.example/"]})
    w.cancelled = await submit(w.acme, "/scrape", {"urls": ["https://shop.example/p/4"]})
    response = await client.post(f"{API}/jobs/{w.cancelled}/cancel", headers=w.acme)
    assert response.status_code == 200, response.text
    w.others_job = await submit(w.other, "/scrape", {"urls": ["https://other.example/"]})
    await settle(db, w.others_job, {"https://other.example/": "succeeded"})

    for headers, attr in ((w.acme, "schedule"), (w.other, "others_schedule")):
        response = await client.post(
            f"{API}/schedules",
            json={
                "cron": "0 3 * * *",
                "kind": "scrape",
                "template": {"urls": ["https://a.example/"]},
            },
            headers=headers,
        )
        assert response.status_code == 201, response.text
        setattr(w, attr, response.json()["id"])

    for n in range(MAX_ACTIVE):
        await create_job(db, [f"https://full.example/{n}"], tenant="full")
    await _sql(
        db,
        "INSERT INTO tenant_limits (tenant, tat) VALUES ('throttled', now() + interval '1 hour')",
    )
    w.stopped_worker = str(uuid.uuid4())
    await _sql(
        db,
        "INSERT INTO workers (id, hostname, pid, concurrency, state, version) "
        "VALUES (:id, 'gone', 1, 8, 'stopped', 'test')",
        id=w.stopped_worker,
    )
    response = await client.post(
        f"{API}/admin/api-keys", json={"name": "to-revoke"}, headers=w.admin
    )
    assert response.status_code == 201, response.text
    created = response.json()
    w.revoked = bearer(created["key"])
    response = await client.delete(f"{API}/admin/api-keys/{created['id']}", headers=w.admin)
    assert response.status_code == 200, response.text
    return w


# --------------------------------------------------------------------------------------
# The state: every table, its row count and a checksum of its rows


async def snapshot(db: ConnectionManager, audit_upto: int) -> dict[str, tuple[int, str]]:
    """Row count and checksum of every table (admin_audit: its rows up to `audit_upto`)."""
    async with db.engine.connect() as conn:
        columns: dict[str, list[str]] = {}
        rows = await conn.execute(
            text(
                "SELECT c.table_name, c.column_name FROM information_schema.columns c "
                "JOIN information_schema.tables t USING (table_schema, table_name) "
                "WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' "
                "ORDER BY c.table_name, c.ordinal_position"
            )
        )
        for table, column in rows:
            if (table, column) not in VOLATILE:
                columns.setdefault(table, []).append(column)
        state: dict[str, tuple[int, str]] = {}
        for table, names in columns.items():
            row_text = "ROW(" + ", ".join(f'"{n}"' for n in names) + ")::text"
            where = f"WHERE id <= {int(audit_upto)}" if table == AUDIT else ""
            count, digest = (
                await conn.execute(
                    text(
                        f"SELECT count(*), md5(coalesce(string_agg(r, E'\\n' ORDER BY r), '')) "
                        f'FROM (SELECT {row_text} AS r FROM "{table}" {where}) s'
                    )
                )
            ).one()
            state[table] = (int(count), str(digest))
    return state


async def refusals_on_record(db: ConnectionManager, after_id: int) -> list[tuple[str, bool]]:
    rows = await _sql(
        db, "SELECT action, ok FROM admin_audit WHERE id > :id ORDER BY id", id=after_id
    )
    return [(str(action), bool(ok)) for action, ok in rows]


# --------------------------------------------------------------------------------------
# The battery


@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    path: str
    headers: Headers
    status: int
    json: Any = None
    content: bytes | None = None
    query: dict[str, Any] | None = None
    audited: str | None = None  # an admin refusal: the action put on record
    # refused only once the database was asked (a reused Idempotency-Key): it counts
    # against the tenant's submission rate as a replay of the key does, so its rate state
    # (tenant_limits.tat, the row exists) may move; nothing else may
    rate_counted: bool = False


def battery(w: World) -> list[Bad]:
    unknown = str(uuid.uuid4())
    scrape = {"urls": ["https://shop.example/new"]}
    crawl = {"seeds": ["https://shop.example/"]}
    long_key = {"Idempotency-Key": "k" * 300}
    raw = {"Content-Type": "application/json"}
    return [
        # auth
        Bad("no key", "POST", "/scrape", {}, 401, json=scrape),
        Bad("malformed key", "POST", "/scrape", {"Authorization": "Bearer nope"}, 401, json=scrape),
        Bad("revoked key", "POST", "/crawl", w.revoked, 401, json=crawl),
        Bad("revoked key, cancel", "POST", f"/jobs/{w.running}/cancel", w.revoked, 401),
        Bad("user key, pause", "POST", "/admin/queue/pause", w.acme, 403),
        Bad("user key, purge", "POST", "/admin/jobs/purge", w.acme, 403, json={"older_than_s": 0}),
        Bad("user key, create key", "POST", "/admin/api-keys", w.acme, 403, json={"name": "x"}),
        Bad("user key, revoke key", "DELETE", f"/admin/api-keys/{w.admin_key_id}", w.acme, 403),
        Bad("user key, requeue", "POST", "/admin/tasks/requeue-expired", w.acme, 403),
        Bad("user key, drain", "POST", f"/admin/workers/{w.stopped_worker}/drain", w.acme, 403),
        # submissions: invalid bodies
        Bad("not JSON", "POST", "/scrape", {**w.acme, **raw}, 422, content=b'{"urls": ['),
        Bad("not UTF-8", "POST", "/scrape", {**w.acme, **raw}, 400, content=b"\xff\xfe\x00"),
        Bad("no urls", "POST", "/scrape", w.acme, 422, json={"urls": []}),
        Bad("ftp URL", "POST", "/scrape", w.acme, 422, json={"urls": ["ftp://shop.example/"]}),
        Bad("unknown field", "POST", "/scrape", w.acme, 422, json={**scrape, "extarct": {}}),
        Bad(
            "bad selector",
            "POST",
            "/scrape",
            w.acme,
            422,
            json={**scrape, "extract": {"t": {"css": "h1[[["}}},
        ),
        Bad("priority 101", "POST", "/scrape", w.acme, 422, json={**scrape, "priority": 101}),
        Bad(
            "10,001 URLs",
            "POST",
            "/scrape",
            w.acme,
            422,
            json={"urls": [f"https://a.example/{i}" for i in range(10_001)]},
        ),
        Bad("long Idempotency-Key", "POST", "/scrape", {**w.acme, **long_key}, 422, json=scrape),
        Bad(
            "bad include regex",
            "POST",
            "/crawl",
            w.acme,
            422,
            json={**crawl, "follow": {"include": ["("]}},
        ),
        Bad(
            "negative depth",
            "POST",
            "/crawl",
            w.acme,
            422,
            json={**crawl, "follow": {"max_depth": -1}},
        ),
        Bad(
            "reserved webhook header",
            "POST",
            "/scrape",
            w.acme,
            422,
            json={
                **scrape,
                "webhook": {"url": "https://h.example/", "headers": {"Trawler-Signature": "x"}},
            },
        ),
        # text the database cannot store (NUL)
        Bad(
            "NUL in a crawl pattern",
            "POST",
            "/crawl",
            w.acme,
            422,
            json={**crawl, "follow": {"include": ["a\x00"]}},
        ),
        Bad(
            "NUL in a webhook secret",
            "POST",
            "/scrape",
            w.acme,
            422,
            json={
                **scrape,
                "webhook": {"url": "https://h.example/", "secret": "0123456789abcdef\x00"},
            },
        ),
        Bad(
            "NUL in a schedule name",
            "POST",
            "/schedules",
            w.acme,
            422,
            json={"name": "a\x00", "cron": "0 3 * * *", "kind": "scrape", "template": scrape},
        ),
        Bad(
            "NUL in a purge tenant",
            "POST",
            "/admin/jobs/purge",
            w.admin,
            422,
            json={"older_than_s": 0, "tenant": "a\x00"},
        ),
        Bad(
            "NUL in v1 excludePaths",
            "POST",
            "/v1/crawl",
            w.acme,
            400,
            json={"url": "https://shop.example/", "excludePaths": ["a\x00"]},
        ),
        # submissions refused after parsing: the SSRF guard, the idempotency key
        Bad("private target", "POST", "/scrape", w.acme, 422, json={"urls": ["http://10.0.0.1/"]}),
        Bad(
            "metadata target",
            "POST",
            "/crawl",
            w.acme,
            422,
            json={"seeds": ["http://169.254.169.254/"]},
        ),
        Bad(
            "private webhook",
            "POST",
            "/scrape",
            w.acme,
            422,
            json={**scrape, "webhook": {"url": "http://127.0.0.1:9/"}},
        ),
        Bad(
            "private target, new tenant",
            "POST",
            "/scrape",
            w.fresh,
            422,
            json={"urls": ["http://[::1]/"]},
        ),
        Bad(
            "private webhook, new tenant",
            "POST",
            "/crawl",
            w.fresh,
            422,
            json={**crawl, "webhook": {"url": "http://localhost/"}},
        ),
        Bad(
            "reused Idempotency-Key",
            "POST",
            "/scrape",
            {**w.acme, "Idempotency-Key": "order-1"},
            409,
            json=scrape,
            rate_counted=True,
        ),
        Bad(
            "preview, private",
            "POST",
            "/scrape/preview",
            w.acme,
            422,
            json={"url": "http://192.168.1.1/"},
        ),
        Bad(
            "preview, private, new tenant",
            "POST",
            "/scrape/preview",
            w.fresh,
            422,
            json={"url": "http://127.0.0.1/"},
        ),
        Bad(
            "preview, bad selector",
            "POST",
            "/scrape/preview",
            w.acme,
            422,
            json={"url": "https://shop.example/", "extract": {"t": {"xpath": "//["}}},
        ),
        # limits
        Bad("at the active-jobs limit", "POST", "/scrape", w.full, 429, json=scrape),
        Bad("out of submission rate", "POST", "/crawl", w.throttled, 429, json=crawl),
        Bad(
            "preview, out of rate",
            "POST",
            "/scrape/preview",
            w.throttled,
            429,
            json={"url": "https://shop.example/"},
        ),
        # jobs
        Bad("cancel a completed job", "POST", f"/jobs/{w.completed}/cancel", w.acme, 409),
        Bad("cancel an unknown job", "POST", f"/jobs/{unknown}/cancel", w.acme, 404),
        Bad("cancel another tenant's job", "POST", f"/jobs/{w.others_job}/cancel", w.acme, 404),
        Bad("cancel, not a UUID", "POST", "/jobs/123/cancel", w.acme, 422),
        Bad("retry a running job", "POST", f"/jobs/{w.running}/retry", w.acme, 409),
        Bad("retry, no failed task", "POST", f"/jobs/{w.others_job}/retry", w.other, 409),
        Bad("resume a running job", "POST", f"/jobs/{w.running}/resume", w.acme, 409),
        Bad("resume another tenant's job", "POST", f"/jobs/{w.cancelled}/resume", w.other, 404),
        Bad("delete a running job", "DELETE", f"/jobs/{w.running}", w.acme, 409),
        Bad("delete a queued crawl", "DELETE", f"/jobs/{w.queued_crawl}", w.acme, 409),
        Bad("delete another tenant's job", "DELETE", f"/jobs/{w.completed}", w.other, 404),
        Bad(
            "bulk, unknown action",
            "POST",
            "/jobs/bulk",
            w.acme,
            422,
            json={"action": "explode", "ids": [w.completed]},
        ),
        Bad(
            "bulk, 1,001 ids",
            "POST",
            "/jobs/bulk",
            w.acme,
            422,
            json={"action": "delete", "ids": [str(uuid.uuid4()) for _ in range(1001)]},
        ),
        Bad(
            "bulk retry at the limit",
            "POST",
            "/jobs/bulk",
            w.full,
            429,
            json={"action": "retry", "ids": [unknown]},
        ),
        Bad("list, bad cursor", "GET", "/jobs", w.acme, 422, query={"cursor": "garbage"}),
        Bad("list, bad status", "GET", "/jobs", w.acme, 422, query={"status": "exploded"}),
        Bad(
            "pages, bad cursor",
            "GET",
            f"/jobs/{w.completed}/pages",
            w.acme,
            422,
            query={"cursor": "WzEsMl0"},
        ),
        Bad("events of another tenant's job", "GET", f"/jobs/{w.others_job}/events", w.acme, 404),
        # webhooks
        Bad(
            "redeliver a pending delivery",
            "POST",
            f"/jobs/{w.completed}/webhooks/{w.delivery}/redeliver",
            w.acme,
            409,
        ),
        Bad(
            "redeliver, unknown delivery",
            "POST",
            f"/jobs/{w.completed}/webhooks/999999/redeliver",
            w.acme,
            404,
        ),
        Bad(
            "redeliver, another tenant",
            "POST",
            f"/jobs/{w.completed}/webhooks/{w.delivery}/redeliver",
            w.other,
            404,
        ),
        # schedules
        Bad(
            "schedule, bad cron",
            "POST",
            "/schedules",
            w.acme,
            422,
            json={"cron": "61 * * * *", "kind": "scrape", "template": scrape},
        ),
        Bad(
            "schedule, every second",
            "POST",
            "/schedules",
            w.acme,
            422,
            json={"cron": "* * * * * *", "kind": "scrape", "template": scrape},
        ),
        Bad(
            "schedule, bad time zone",
            "POST",
            "/schedules",
            w.acme,
            422,
            json={
                "cron": "0 3 * * *",
                "timezone": "Mars/Olympus",
                "kind": "scrape",
                "template": scrape,
            },
        ),
        Bad(
            "schedule, bad template",
            "POST",
            "/schedules",
            w.acme,
            422,
            json={"cron": "0 3 * * *", "kind": "crawl", "template": scrape},
        ),
        Bad(
            "schedule, private target",
            "POST",
            "/schedules",
            w.acme,
            422,
            json={
                "cron": "0 3 * * *",
                "kind": "scrape",
                "template": {"urls": ["http://10.1.1.1/"]},
            },
        ),
        Bad(
            "delete another tenant's schedule",
            "DELETE",
            f"/schedules/{w.others_schedule}",
            w.acme,
            404,
        ),
        Bad(
            "disable another tenant's schedule",
            "POST",
            f"/schedules/{w.others_schedule}/disable",
            w.acme,
            404,
        ),
        Bad("enable an unknown schedule", "POST", f"/schedules/{unknown}/enable", w.acme, 404),
        # export
        Bad(
            "export, unknown format",
            "GET",
            f"/export/jobs/{w.completed}",
            w.acme,
            422,
            query={"format": "pdf"},
        ),
        Bad("export, another tenant's job", "GET", f"/export/jobs/{w.completed}", w.other, 404),
        Bad(
            "export, no such column",
            "GET",
            f"/export/jobs/{w.completed}",
            w.acme,
            422,
            query={"fields": "x" * 200},
        ),
        # admin (refusals are put on record)
        Bad(
            "purge, older_than_s false",
            "POST",
            "/admin/jobs/purge",
            w.admin,
            422,
            json={"older_than_s": False},
        ),
        Bad(
            "purge, negative age",
            "POST",
            "/admin/jobs/purge",
            w.admin,
            422,
            json={"older_than_s": -1},
        ),
        Bad(
            "purge, running jobs",
            "POST",
            "/admin/jobs/purge",
            w.admin,
            422,
            json={"older_than_s": 0, "statuses": ["running"]},
        ),
        Bad(
            "key, control character", "POST", "/admin/api-keys", w.admin, 422, json={"name": "a\nb"}
        ),
        Bad(
            "key, unknown role",
            "POST",
            "/admin/api-keys",
            w.admin,
            422,
            json={"name": "x", "role": "root"},
        ),
        Bad(
            "revoke the last admin key",
            "DELETE",
            f"/admin/api-keys/{w.admin_key_id}",
            w.admin,
            409,
            audited="api_key.revoke",
        ),
        Bad(
            "revoke an unknown key",
            "DELETE",
            f"/admin/api-keys/{unknown}",
            w.admin,
            404,
            audited="api_key.revoke",
        ),
        Bad(
            "drain a stopped worker",
            "POST",
            f"/admin/workers/{w.stopped_worker}/drain",
            w.admin,
            409,
            audited="worker.drain",
        ),
        Bad(
            "drain an unknown worker",
            "POST",
            f"/admin/workers/{unknown}/drain",
            w.admin,
            404,
            audited="worker.drain",
        ),
        Bad("metrics, user key", "GET", "/metrics", w.acme, 403),
        # Firecrawl-compatible routes
        Bad(
            "v2 crawl, no key", "POST", "/v2/crawl", {}, 401, json={"url": "https://shop.example/"}
        ),
        Bad("v2 crawl, no url", "POST", "/v2/crawl", w.acme, 400, json={"limit": 5}),
        Bad(
            "v2 crawl, private", "POST", "/v2/crawl", w.acme, 403, json={"url": "http://10.0.0.2/"}
        ),
        Bad(
            "v2 crawl, private, new tenant",
            "POST",
            "/v2/crawl",
            w.fresh,
            403,
            json={"url": "http://127.0.0.1/"},
        ),
        Bad(
            "v2 crawl, bad includePaths",
            "POST",
            "/v2/crawl",
            w.acme,
            400,
            json={"url": "https://shop.example/", "includePaths": ["("]},
        ),
        Bad("v1 crawl, not a URL", "POST", "/v1/crawl", w.acme, 400, json={"url": ""}),
        Bad(
            "v2 crawl, at the limit",
            "POST",
            "/v2/crawl",
            w.full,
            429,
            json={"url": "https://shop.example/"},
        ),
        Bad(
            "v2 batch, no valid URL",
            "POST",
            "/v2/batch/scrape",
            w.acme,
            400,
            json={"urls": ["http://10.0.0.1/", " "], "ignoreInvalidURLs": True},
        ),
        Bad(
            "v2 batch, appendToId",
            "POST",
            "/v2/batch/scrape",
            w.acme,
            400,
            json={"urls": ["https://a.example/"], "appendToId": w.completed},
        ),
        Bad(
            "v2 scrape, private",
            "POST",
            "/v2/scrape",
            w.acme,
            403,
            json={"url": "http://169.254.169.254/"},
        ),
        Bad(
            "v1 scrape, unknown format",
            "POST",
            "/v1/scrape",
            w.acme,
            400,
            json={"url": "https://shop.example/", "formats": ["hologram"]},
        ),
        Bad("v2 map, private", "POST", "/v2/map", w.fresh, 403, json={"url": "http://10.9.9.9/"}),
        Bad("v2 cancel a completed crawl", "DELETE", f"/v2/crawl/{w.completed}", w.acme, 404),
        Bad(
            "v2 cancel another tenant's crawl",
            "DELETE",
            f"/v2/crawl/{w.queued_crawl}",
            w.other,
            404,
        ),
        Bad("v1 crawl status, not an id", "GET", "/v1/crawl/nope", w.acme, 404),
        Bad("v2 batch cancel, finished", "DELETE", f"/v2/batch/scrape/{w.completed}", w.acme, 409),
        Bad("v2 unsupported route", "POST", "/v2/search", w.acme, 404, json={"query": "x"}),
        Bad(
            "v2 crawl, wrong method",
            "PUT",
            "/v2/crawl",
            w.acme,
            405,
            json={"url": "https://a.example/"},
        ),
    ]


def _path(bad: Bad) -> str:
    return bad.path if bad.path.startswith(("/v1/", "/v2/", "/metrics")) else API + bad.path


async def test_rejected_requests_change_nothing(
    client: httpx.AsyncClient, db: ConnectionManager, world: World
) -> None:
    requests = battery(world)
    last_audit = int((await _sql(db, "SELECT coalesce(max(id), 0) FROM admin_audit"))[0][0])
    before = await snapshot(db, last_audit)
    audits_expected: list[tuple[str, bool]] = []
    wrong_status: list[str] = []
    changed: list[str] = []
    statuses: Counter[int] = Counter()
    for bad in requests:
        response = await client.request(
            bad.method,
            _path(bad),
            headers=bad.headers,
            json=bad.json,
            content=bad.content,
            params=bad.query,
        )
        statuses[response.status_code] += 1
        if response.status_code != bad.status:
            wrong_status.append(
                f"{bad.name}: {response.status_code} (expected {bad.status}) {response.text[:200]}"
            )
        if bad.audited is not None:
            audits_expected.append((bad.audited, False))
        after = await snapshot(db, last_audit)
        moved = [t for t in sorted(after) if after[t] != before.get(t)]
        moved += [t for t in before if t not in after]
        if bad.rate_counted and moved == [RATE] and after[RATE][0] == before[RATE][0]:
            moved = []
        elif moved:
            changed.append(f"{bad.name} ({response.status_code}): {', '.join(moved)} changed")
        before = after  # each request is compared with the state just before it
    audits = await refusals_on_record(db, last_audit)
    print(
        f"\nbad input: {len(requests)} refused requests {dict(sorted(statuses.items()))}; "
        f"{len(before)} tables compared after each; admin refusals on record: {len(audits)}"
    )
    assert not wrong_status and not changed, "\n".join([*wrong_status, "", *changed])
    assert audits == audits_expected


# --------------------------------------------------------------------------------------
# Findings of the fuzz (scenario 8) and of this battery, pinned one by one


async def test_openapi_documents_the_error_answers(client: httpx.AsyncClient) -> None:
    """Errors were undocumented: FastAPI's 422 (HTTPValidationError, application/json) is
    not what Trawler sends, and 400/401/403/404/409/429/503 were missing."""
    schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    cancel = paths["/api/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert set(cancel) >= {"200", "401", "404", "409", "422", "503"}
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert cancel["422"]["content"] == problem
    assert "Retry-After" in cancel["503"]["headers"]
    assert set(paths["/api/v1/scrape"]["post"]["responses"]) >= {"400", "409", "422", "429"}
    assert "403" in paths["/api/v1/admin/queue/pause"]["post"]["responses"]
    crawl = paths["/v2/crawl"]["post"]["responses"]
    assert "422" not in crawl  # the Firecrawl routes answer bad input with a 400
    assert crawl["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/FirecrawlError"
    }
    assert "503" in paths["/health/ready"]["get"]["responses"]
    assert set(paths["/health/live"]["get"]["responses"]) == {"200"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    created_after = next(
        p for p in paths["/api/v1/jobs"]["get"]["parameters"] if p["name"] == "created_after"
    )
    assert {"type": "number", "description": "Unix time in seconds"} in created_after["schema"][
        "anyOf"
    ]


async def test_a_405_lists_every_method_of_the_path(
    client: httpx.AsyncClient, headers: Headers
) -> None:
    """Allow named only the methods of the first route matching the path (GET /jobs/{id},
    not DELETE); the Firecrawl catch-all answered 404 to a known path asked with another
    method."""
    response = await client.request("OPTIONS", f"{API}/jobs/{uuid.uuid4()}", headers=headers)
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, HEAD"
    response = await client.put("/v2/crawl", json={"url": "https://a.example/"}, headers=headers)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["success"] is False
    response = await client.post("/v2/search", json={}, headers=headers)
    assert response.status_code == 404  # not part of the API: still Firecrawl's 404


async def test_a_delivery_id_beyond_bigint_is_422(
    client: httpx.AsyncClient, headers: Headers
) -> None:
    """It overflowed the query parameter: a 500."""
    for delivery in (2**63, 10**30, 0):
        response = await client.post(
            f"{API}/jobs/{uuid.uuid4()}/webhooks/{delivery}/redeliver", headers=headers
        )
        assert response.status_code == 422, response.text


BIG = 10**30
NESTED = "(" * 490 + ")" * 490  # the regex compiler recursed too deep
UNCOMPILABLE = [
    (
        "POST",
        f"{API}/crawl",
        {"seeds": ["https://a.example/"], "follow": {"include": ["a{99999999999}"]}},
        422,
    ),
    (
        "POST",
        f"{API}/crawl",
        {"seeds": ["https://a.example/"], "follow": {"exclude": [NESTED]}},
        422,
    ),
    ("POST", "/v2/crawl", {"url": "https://a.example/", "includePaths": [NESTED]}, 400),
    (
        "POST",
        "/v2/crawl",
        {"url": "https://a.example/", "excludePaths": ["a{99999999999}"], "regexOnFullURL": True},
        400,
    ),
    ("POST", "/v1/crawl", {"url": "https://a.example/", "maxDepth": 2**62}, 200),  # no limit
    ("POST", "/v1/crawl", {"url": "https://a.example/", "maxDepth": BIG}, 400),
    ("POST", "/v2/crawl", {"url": "https://a.example/", "maxDiscoveryDepth": BIG}, 400),
    ("POST", "/v2/crawl", {"url": "https://a.example/", "maxConcurrency": BIG}, 400),
    ("POST", "/v2/crawl", {"url": "https://a.example/", "delay": 1e308}, 400),
    ("POST", "/v2/crawl", {"url": "https://a.example/", "scrapeOptions": {"timeout": BIG}}, 400),
    (
        "POST",
        "/v2/crawl",
        {
            "url": "https://a.example/",
            "webhook": {"url": "https://h.example/", "metadata": {"n": BIG}},
        },
        400,
    ),
    (
        "POST",
        "/v2/crawl",
        {"url": "https://a.example/", "scrapeOptions": {"actions": [{"wait": -BIG}]}},
        400,
    ),
    ("POST", "/v2/batch/scrape", {"urls": ["https://a.example/"], "maxConcurrency": BIG}, 400),
    ("POST", "/v2/map", {"url": "https://a.example/", "timeout": BIG}, 400),
    ("POST", "/v2/scrape", {"url": "https://a.example/", "timeout": BIG}, 400),
    # a NUL in text PostgreSQL is asked to store or compare (22021 / 22P05)
    (
        "POST",
        f"{API}/crawl",
        {"seeds": ["https://a.example/"], "follow": {"include": ["\x00"]}},
        422,
    ),
    (
        "POST",
        f"{API}/schedules",
        {
            "name": "\x00",
            "cron": "0 3 * * *",
            "kind": "scrape",
            "template": {"urls": ["https://a.example/"]},
        },
        422,
    ),
    (
        "POST",
        "/v2/batch/scrape",
        {
            "urls": ["https://a.example/"],
            "webhook": {"url": "https://h.example/", "metadata": {"k": "\x00"}},
        },
        400,
    ),
    ("POST", "/v1/crawl", {"url": "https://a.example/", "includePaths": ["\x00"]}, 400),
]


async def test_numbers_and_patterns_the_server_cannot_use_are_refused(
    client: httpx.AsyncClient, db: ConnectionManager, headers: Headers
) -> None:
    """Each was a 500: a repeat count or nesting the regex compiler refuses with
    OverflowError / RecursionError, a count or delay that overflowed, a number beyond 64
    bits in the Firecrawl options stored with the job, a NUL character in text stored or
    compared by PostgreSQL. Only the one valid request stores a job."""
    wrong = []
    for method, path, body, status in UNCOMPILABLE:
        response = await client.request(method, path, json=body, headers=headers)
        if response.status_code != status:
            wrong.append(f"{method} {path} {body}: {response.status_code} {response.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert (await _sql(db, "SELECT count(*) FROM jobs"))[0][0] == 1
