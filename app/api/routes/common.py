"""Helpers shared by the route modules: job lookup, Location, opaque cursors, headers."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime

import orjson

from app.api.errors import NotFound, Unprocessable
from app.api.schemas import JobPublic
from app.database.models import JobStatus
from app.services import jobs
from app.services.jobs import Conn, JobKey

API_PREFIX = "/api/v1"
IDEMPOTENCY_KEY_MAX = 255


async def job_or_404(conn: Conn, tenant: str, job_id: uuid.UUID) -> JobPublic:
    job = await jobs.get_job(conn, tenant, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def job_location(job_id: uuid.UUID) -> str:
    return f"{API_PREFIX}/jobs/{job_id}"


# Cursors are opaque to clients: base64url (unpadded) of a small JSON array. They carry
# only a position, never a filter, so a tampered cursor can at worst skip rows the
# caller may see anyway; every query stays tenant-scoped.


def encode_cursor(*parts: str | int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).rstrip(b"=").decode("ascii")


def _decode(cursor: str) -> list[object]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise Unprocessable("invalid cursor: pass next_cursor back unchanged") from None
    if not isinstance(value, list):
        raise Unprocessable("invalid cursor: pass next_cursor back unchanged")
    return value


def encode_job_cursor(key: JobKey | None) -> str | None:
    if key is None:
        return None
    created_at, job_id = key
    return encode_cursor(created_at.isoformat(), str(job_id))


def decode_job_cursor(cursor: str | None) -> JobKey | None:
    if cursor is None:
        return None
    parts = _decode(cursor)
    try:
        created_text, id_text = parts
        created_at = datetime.fromisoformat(str(created_text))
        job_id = uuid.UUID(str(id_text))
    except (TypeError, ValueError):
        raise Unprocessable("invalid cursor: pass next_cursor back unchanged") from None
    if created_at.tzinfo is None:
        raise Unprocessable("invalid cursor: pass next_cursor back unchanged")
    return created_at, job_id


def encode_page_cursor(after: int | None) -> str | None:
    return None if after is None else encode_cursor(after)


def decode_page_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    parts = _decode(cursor)
    value = parts[0] if len(parts) == 1 else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise Unprocessable("invalid cursor: pass next_cursor back unchanged")
    return value


def parse_statuses(values: list[str] | None) -> list[JobStatus]:
    """`status=queued&status=running` and `status=queued,running` both work."""
    statuses: list[JobStatus] = []
    for value in values or []:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                statuses.append(JobStatus(part))
            except ValueError:
                allowed = ", ".join(s.value for s in JobStatus)
                raise Unprocessable(f"unknown status {part!r}; one of: {allowed}") from None
    return statuses


def as_utc(value: datetime | None) -> datetime | None:
    """Timestamps without a zone are read as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def check_idempotency_key(key: str | None) -> str | None:
    """None when absent; a 422 for an empty, over-long or non-printable key."""
    if key is None:
        return None
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise Unprocessable(f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable characters")
    return key
