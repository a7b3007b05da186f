"""Webhooks: the outbox of job events, its delivery by the workers, signatures, the log.

The outbox rows (`webhook_deliveries`) are written in the transaction that makes the
event happen: job status events by app.services.state.transition, `job.page` events by
record_page_events right after the executor stores a batch of results. A row is thus
committed exactly when its event is, and delivered at least once afterwards:

* any worker claims due rows (FOR UPDATE SKIP LOCKED) and pushes them one lease ahead in
  the same statement, then POSTs them outside any transaction; a worker that dies
  mid-request leaves its rows due again when the lease runs out;
* the outcome is recorded fenced by the attempt number, so a worker whose lease ran out
  cannot overwrite a later attempt's result;
* a failed attempt is retried with exponential backoff (settings webhook_retry_base_s,
  doubled per attempt up to webhook_retry_max_s, up to webhook_max_attempts attempts);
* receivers deduplicate on the event id (body `id`, header Trawler-Webhook-Id), which a
  redelivery keeps.

Signature (when the webhook has a secret): header
`Trawler-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
verify_signature() is the reference check; docs/WEBHOOKS.md explains it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.api.schemas import WebhookDeliveryPublic, WebhookPublic
from app.config import Settings
from app.database.connection import ConnectionManager
from app.errors import Conflict, NotFound
from app.scraper.ssrf import BlockedResolution, BlockedTarget, GuardedResolver, SSRFGuard
from app.services.state import job_json, utc_text

logger = logging.getLogger(__name__)

NOTIFY_WEBHOOKS = "trawler_webhooks"
SIGNATURE_HEADER = "Trawler-Signature"
EVENT_HEADER = "Trawler-Event"
ID_HEADER = "Trawler-Webhook-Id"
ATTEMPT_HEADER = "Trawler-Delivery-Attempt"
DEFAULT_TOLERANCE_S = 300
_MAX_ERROR_CHARS = 500


# --------------------------------------------------------------------------------------
# Signatures


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The Trawler-Signature header value of `body` sent at `timestamp` (unix seconds)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(secret, t, body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether `header` signs `body` with `secret` within `tolerance_s` of now.

    The timestamp is part of the signed message, so a captured delivery cannot be
    replayed later than the tolerance; within it, receivers deduplicate on the event id.
    Several v1 entries (e.g. during a secret rotation) are accepted if any one matches.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """Delay after failed attempt `attempt` (1-based): base * 2^(attempt-1), capped, minus up
    to 20% jitter (so receivers coming back are not hit by every delivery at once)."""
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    return delay * random.uniform(0.8, 1.0)


# --------------------------------------------------------------------------------------
# Outbox: job.page events, written in the executor's completion transaction


# Pages inserted by the current transaction (xmin is its id), of jobs whose webhook wants
# job.page: a page a previous lease holder stored is not announced a second time.
_PAGE_EVENTS_SQL = text(
    f"""
INSERT INTO webhook_deliveries (job_id, event, payload)
SELECT p.job_id, 'job.page', jsonb_build_object(
    'job', {job_json("j")},
    'page', jsonb_build_object(
        'url', p.url, 'final_url', p.final_url, 'status_code', p.status_code, 'ok', p.ok,
        'depth', p.depth, 'fetched_at', {utc_text("p.fetched_at")},
        'elapsed_ms', p.elapsed_ms, 'data', p.data, 'error', p.error))
FROM pages p
JOIN job_webhooks w ON w.job_id = p.job_id AND 'job.page' = ANY(w.events)
JOIN jobs j ON j.id = p.job_id
WHERE p.task_id = ANY(CAST(:tasks AS bigint[])) AND p.xmin = pg_current_xact_id()::xid
ORDER BY p.id
"""
)


async def record_page_events(conn: AsyncConnection, task_ids: Sequence[int]) -> int:
    """Outbox rows for the pages of `task_ids` stored by the current transaction."""
    if not task_ids:
        return 0
    result = await conn.execute(_PAGE_EVENTS_SQL, {"tasks": list(task_ids)})
    return int(getattr(result, "rowcount", 0) or 0)


_PAGE_HOOK_JOBS_SQL = text(
    "SELECT job_id FROM job_webhooks WHERE job_id = ANY(CAST(:ids AS uuid[])) "
    "AND 'job.page' = ANY(events)"
)


async def jobs_with_page_events(
    conn: AsyncConnection, job_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of these jobs want job.page events (the executor asks once per job)."""
    if not job_ids:
        return set()
    rows = await conn.execute(_PAGE_HOOK_JOBS_SQL, {"ids": list(job_ids)})
    return {row[0] for row in rows}


# --------------------------------------------------------------------------------------
# Delivery


@dataclass(slots=True)
class Delivery:
    id: int
    event_id: uuid.UUID
    job_id: uuid.UUID
    event: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime
    url: str
    headers: dict[str, str]
    secret: str | None

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "id": str(self.event_id),
                "event": self.event,
                "created_at": self.created_at,
                **self.payload,
            },
            option=orjson.OPT_UTC_Z,
        )


@dataclass(slots=True)
class Attempt:
    delivery: Delivery
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# THE DELIVERY CLAIM: due pending rows, locked SKIP LOCKED so concurrent workers take
# disjoint sets, and pushed one lease ahead in the same statement, so that no transaction
# stays open during the HTTP request and a lost worker's rows come due again by themselves.
_CLAIM_SQL = text(
    """
WITH due AS (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT :n
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE webhook_deliveries d SET
        attempts = d.attempts + 1, last_attempt_at = now(),
        next_attempt_at = now() + make_interval(secs => :lease)
    FROM due WHERE d.id = due.id
    RETURNING d.id, d.event_id, d.job_id, d.event, d.payload, d.attempts, d.created_at
)
SELECT c.id, c.event_id, c.job_id, c.event, c.payload, c.attempts, c.created_at,
       w.url, w.headers, w.secret
FROM claimed c JOIN job_webhooks w ON w.job_id = c.job_id
ORDER BY c.id
"""
)

# Fenced by the attempt number: only the holder of the latest attempt records its outcome.
_RECORD_SQL = text(
    """
UPDATE webhook_deliveries d SET
    status = CASE WHEN v.ok THEN 'delivered'
                  WHEN d.attempts >= :max_attempts THEN 'failed'
                  ELSE 'pending' END,
    delivered_at = CASE WHEN v.ok THEN now() END,
    next_attempt_at = CASE WHEN v.ok OR d.attempts >= :max_attempts THEN d.next_attempt_at
                           ELSE now() + make_interval(secs => v.delay) END,
    last_status_code = v.code, last_error = v.error
FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[]), CAST(:oks AS bool[]),
            CAST(:codes AS int[]), CAST(:errors AS text[]), CAST(:delays AS float8[]))
    AS v(id, attempt, ok, code, error, delay)
WHERE d.id = v.id AND d.attempts = v.attempt AND d.status = 'pending'
"""
)


class WebhookSender:
    """POSTs deliveries: SSRF-guarded (the URL and every resolved address), bounded in
    time, no redirects followed, no cookies, no proxy from the environment."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.guard = SSRFGuard(
            allow_private=settings.allow_private_networks, allow_cidrs=settings.allowed_cidrs
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # created on first use: aiohttp binds a session to the running loop
            resolver = None if self.guard.allow_private else GuardedResolver(self.guard)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.settings.webhook_concurrency, resolver=resolver
                ),
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.webhook_timeout_s,
                    sock_connect=self.settings.webhook_connect_timeout_s,
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def request_headers(self, delivery: Delivery, body: bytes) -> dict[str, str]:
        headers = dict(delivery.headers)
        headers.update(
            {
                "Content-Type": "application/json",
                "User-Agent": self.settings.user_agent,
                EVENT_HEADER: delivery.event,
                ID_HEADER: str(delivery.event_id),
                ATTEMPT_HEADER: str(delivery.attempts),
            }
        )
        if delivery.secret:
            headers[SIGNATURE_HEADER] = sign(delivery.secret, body)
        return headers

    async def send(self, delivery: Delivery) -> Attempt:
        """One attempt; every failure is an outcome (status code or error), never raised."""
        try:
            self.guard.check_url(delivery.url)
        except BlockedTarget as error:
            return Attempt(delivery, None, f"blocked: {error}"[:_MAX_ERROR_CHARS])
        body = delivery.body()
        headers = self.request_headers(delivery, body)
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                async with self._client().post(
                    delivery.url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    # a little of the answer, for the log; the rest is not our business
                    snippet = await response.content.read(200)
                    if 200 <= response.status < 300:
                        return Attempt(delivery, response.status, None)
                    reason = snippet.decode("utf-8", "replace").strip()
                    return Attempt(
                        delivery,
                        response.status,
                        f"HTTP {response.status}" + (f": {reason}" if reason else ""),
                    )
        except TimeoutError:
            return Attempt(delivery, None, f"timeout after {self.settings.webhook_timeout_s}s")
        except aiohttp.ClientConnectorError as error:
            cause = error.os_error
            if isinstance(cause, BlockedResolution):
                return Attempt(delivery, None, f"blocked: {cause.blocked}"[:_MAX_ERROR_CHARS])
            return Attempt(delivery, None, f"connect: {error}"[:_MAX_ERROR_CHARS])
        except (aiohttp.ClientError, OSError) as error:
            return Attempt(delivery, None, f"{type(error).__name__}: {error}"[:_MAX_ERROR_CHARS])


async def claim_due(conn: AsyncConnection, limit: int, lease_s: float) -> list[Delivery]:
    rows = await conn.execute(_CLAIM_SQL, {"n": limit, "lease": lease_s})
    return [
        Delivery(
            id=row.id,
            event_id=row.event_id,
            job_id=row.job_id,
            event=row.event,
            payload=_as_dict(row.payload),
            attempts=row.attempts,
            created_at=row.created_at,
            url=row.url,
            headers={str(k): str(v) for k, v in _as_dict(row.headers).items()},
            secret=row.secret,
        )
        for row in rows
    ]


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    loaded = orjson.loads(value)
    return loaded if isinstance(loaded, dict) else {}


async def record(conn: AsyncConnection, attempts: Sequence[Attempt], settings: Settings) -> None:
    if not attempts:
        return
    await conn.execute(
        _RECORD_SQL,
        {
            "ids": [a.delivery.id for a in attempts],
            "attempts": [a.delivery.attempts for a in attempts],
            "oks": [a.ok for a in attempts],
            "codes": [a.status_code for a in attempts],
            "errors": [a.error for a in attempts],
            "delays": [
                backoff_s(
                    a.delivery.attempts, settings.webhook_retry_base_s, settings.webhook_retry_max_s
                )
                for a in attempts
            ],
            "max_attempts": settings.webhook_max_attempts,
        },
    )


def lease_s(settings: Settings) -> float:
    """How long a claimed delivery is held: its request's time limit, and a margin."""
    return settings.webhook_timeout_s + 30.0


async def deliver_due(db: ConnectionManager, sender: WebhookSender, settings: Settings) -> int:
    """Claim due deliveries, POST them concurrently, record the outcomes; returns how many
    were claimed (a full batch means: call again)."""
    async with db.connect() as conn:
        due = await claim_due(conn, settings.webhook_batch, lease_s(settings))
    if not due:
        return 0
    gate = asyncio.Semaphore(settings.webhook_concurrency)

    async def one(delivery: Delivery) -> Attempt:
        async with gate:
            return await sender.send(delivery)

    attempts = await asyncio.gather(*(one(d) for d in due))
    async with db.connect() as conn:
        await record(conn, attempts, settings)
    for attempt in attempts:
        if not attempt.ok:
            logger.info(
                "webhook %s of job %s (attempt %d) to %s failed: %s",
                attempt.delivery.event,
                attempt.delivery.job_id,
                attempt.delivery.attempts,
                attempt.delivery.url,
                attempt.error,
            )
    return len(due)


# --------------------------------------------------------------------------------------
# The delivery log and redelivery (API)


_WEBHOOK_OF_JOB_SQL = text(
    """
SELECT j.id, w.url, w.events, w.headers, w.secret IS NOT NULL AS signed
FROM jobs j LEFT JOIN job_webhooks w ON w.job_id = j.id
WHERE j.id = :job AND j.tenant = :tenant
"""
)

_DELIVERY_COLUMNS = (
    "id, event_id, event, status, attempts, next_attempt_at, last_attempt_at, "
    "last_status_code, last_error, delivered_at, redelivery_of, created_at"
)

_LOG_SQL = text(
    f"""
SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries
WHERE job_id = :job AND (CAST(:before AS bigint) IS NULL OR id < CAST(:before AS bigint))
ORDER BY id DESC
LIMIT :n
"""
)


def _delivery_public(row: Mapping[Any, Any]) -> WebhookDeliveryPublic:
    values = dict(row)
    if values["status"] != "pending":
        values["next_attempt_at"] = None
    return WebhookDeliveryPublic.model_validate(values)


async def delivery_log(
    conn: AsyncConnection,
    tenant: str,
    job_id: uuid.UUID,
    *,
    limit: int = 50,
    before: int | None = None,
) -> tuple[WebhookPublic | None, list[WebhookDeliveryPublic], int | None]:
    """The job's webhook and its deliveries, newest first; 404 for another tenant's job."""
    head = (
        (await conn.execute(_WEBHOOK_OF_JOB_SQL, {"job": job_id, "tenant": tenant}))
        .mappings()
        .one_or_none()
    )
    if head is None:
        raise NotFound(f"job {job_id} not found")
    webhook = None
    if head["url"] is not None:
        webhook = WebhookPublic(
            url=head["url"],
            events=list(head["events"]),
            headers=sorted(_as_dict(head["headers"])),
            signed=head["signed"],
        )
    rows = (
        (await conn.execute(_LOG_SQL, {"job": job_id, "before": before, "n": limit + 1}))
        .mappings()
        .all()
    )
    items = [_delivery_public(r) for r in rows[:limit]]
    return webhook, items, (items[-1].id if len(rows) > limit else None)


# A new outbox row for the same event (same event id and body): the log keeps the old one.
_REDELIVER_SQL = text(
    f"""
WITH src AS (
    SELECT d.* FROM webhook_deliveries d JOIN jobs j ON j.id = d.job_id
    WHERE d.id = :delivery AND d.job_id = :job AND j.tenant = :tenant
      AND d.status <> 'pending'
)
INSERT INTO webhook_deliveries (event_id, job_id, event, payload, redelivery_of)
SELECT event_id, job_id, event, payload, id FROM src
RETURNING {_DELIVERY_COLUMNS}, pg_notify('{NOTIFY_WEBHOOKS}', '') AS notified
"""
)

_DELIVERY_STATUS_SQL = text(
    """
SELECT d.status FROM webhook_deliveries d JOIN jobs j ON j.id = d.job_id
WHERE d.id = :delivery AND d.job_id = :job AND j.tenant = :tenant
"""
)


async def redeliver(
    conn: AsyncConnection, tenant: str, job_id: uuid.UUID, delivery_id: int
) -> WebhookDeliveryPublic:
    """Queue the event of a finished delivery (delivered or failed) once more.

    404 for an unknown delivery (or another tenant's job); 409 while it is still pending.
    """
    params = {"delivery": delivery_id, "job": job_id, "tenant": tenant}
    row = (await conn.execute(_REDELIVER_SQL, params)).mappings().one_or_none()
    if row is not None:
        return _delivery_public({k: v for k, v in row.items() if k != "notified"})
    status = (await conn.execute(_DELIVERY_STATUS_SQL, params)).scalar_one_or_none()
    if status is None:
        raise NotFound(f"delivery {delivery_id} of job {job_id} not found")
    raise Conflict(f"delivery {delivery_id} is still pending; it is retried by itself")
