"""Schedules: cron ticks claimed through the database, each submitting one job.

Exactly one run per tick, with any number of workers: a worker locks due schedule rows
with FOR UPDATE SKIP LOCKED, claims the tick by inserting its schedule_runs row (unique
per schedule and tick), submits the job and moves next_run_at on, all in one transaction.
Another worker either skips the locked row or, once it is committed, no longer sees it
due (READ COMMITTED re-checks the condition on the row it locks).

Missed ticks (every worker down, or the schedule's poll came late): the schedule runs
once, for the latest tick that is due, the run records how many earlier ticks were folded
into it (`missed`), and next_run_at continues from now. Nothing is replayed tick by tick.

Overlap, when the previous run's job is still queued or running: `skip` records the tick
as skipped; `queue` keeps one tick waiting (pending_tick) and submits it as soon as the
previous job ends (further ticks meanwhile are skipped: at most one run waits); `allow`
submits regardless.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from itertools import islice, pairwise
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.api.schemas import (
    JobSpecBase,
    ScheduleCreate,
    SchedulePublic,
    ScheduleRunPublic,
    template_model,
)
from app.config import Settings
from app.database.connection import ConnectionManager, is_unavailable
from app.database.models import JobKind, Schedule, ScheduleOverlap
from app.errors import NotFound, TrawlerError, Unprocessable
from app.scraper.ssrf import SSRFGuard
from app.services import jobs

logger = logging.getLogger(__name__)

NEXT_RUNS_SHOWN = 5
_MISSED_COUNT_CAP = 10_000
_REDACTED = "********"

ScheduleKey = tuple[datetime, uuid.UUID]


# --------------------------------------------------------------------------------------
# Cron arithmetic (cronsim; times in the schedule's zone, stored in UTC)


def _local(moment: datetime, timezone: str) -> datetime:
    return moment.astimezone(ZoneInfo(timezone))


def ticks_after(cron: str, timezone: str, moment: datetime, n: int) -> list[datetime]:
    """The next `n` tick times strictly after `moment`, in UTC."""
    return [t.astimezone(UTC) for t in islice(CronSim(cron, _local(moment, timezone)), n)]


def next_tick(cron: str, timezone: str, moment: datetime) -> datetime:
    return ticks_after(cron, timezone, moment, 1)[0]


def latest_tick(cron: str, timezone: str, moment: datetime) -> datetime:
    """The last tick at or before `moment`, in UTC."""
    floor = moment.replace(microsecond=0) + timedelta(seconds=1)
    return next(CronSim(cron, _local(floor, timezone), reverse=True)).astimezone(UTC)


def _missed_between(cron: str, timezone: str, first: datetime, last: datetime) -> int:
    """Ticks in [first, last) (those folded into the run of `last`), counted up to a cap."""
    if last <= first:
        return 0
    count = 1  # `first` itself
    for tick in CronSim(cron, _local(first, timezone)):
        if tick.astimezone(UTC) >= last or count >= _MISSED_COUNT_CAP:
            break
        count += 1
    return count


def check_interval(cron: str, timezone: str, minimum_s: float) -> None:
    """422 when two consecutive ticks (among the next few) come closer than `minimum_s`."""
    ticks = ticks_after(cron, timezone, datetime.now(UTC), 12)
    gaps = [(b - a).total_seconds() for a, b in pairwise(ticks)]
    if gaps and min(gaps) < minimum_s:
        raise Unprocessable(
            f"cron {cron!r} fires every {min(gaps):.0f}s; the shortest interval allowed is "
            f"{minimum_s:.0f}s (TRAWLER_SCHEDULE_MIN_INTERVAL_S)"
        )


# --------------------------------------------------------------------------------------
# API operations (tenant-scoped; the caller's unit of work commits)


_COLUMNS = (
    "id, name, cron, timezone, kind, template, overlap, enabled, next_run_at, pending_tick, "
    "last_run_at, last_job_id, created_at, updated_at"
)


def _redact(template: Mapping[Any, Any]) -> dict[str, Any]:
    shown = dict(template)
    hook = shown.get("webhook")
    if isinstance(hook, dict):
        hook = dict(hook)
        if hook.get("secret"):
            hook["secret"] = _REDACTED
        if isinstance(hook.get("headers"), dict):
            hook["headers"] = dict.fromkeys(hook["headers"], _REDACTED)
        shown["webhook"] = hook
    return shown


def _public(row: Mapping[Any, Any]) -> SchedulePublic:
    values = dict(row)
    values["template"] = _redact(values["template"])
    now = datetime.now(UTC)
    values["next_runs"] = (
        ticks_after(values["cron"], values["timezone"], now, NEXT_RUNS_SHOWN)
        if values["enabled"]
        else []
    )
    return SchedulePublic.model_validate(values)


_INSERT_SQL = text(
    f"""
INSERT INTO schedules (id, tenant, name, cron, timezone, kind, template, overlap, enabled,
                       next_run_at)
VALUES (:id, :tenant, :name, :cron, :timezone, :kind, CAST(:template AS jsonb), :overlap,
        :enabled, :next_run_at)
RETURNING {_COLUMNS}
"""
)


async def create_schedule(
    conn: AsyncConnection,
    tenant: str,
    body: ScheduleCreate,
    *,
    settings: Settings,
    guard: SSRFGuard | None,
) -> SchedulePublic:
    """Validate the template as a submission would be (URLs, SSRF guard, webhook URL) and
    store the schedule; its first tick is the first cron time after now."""
    request = body.job_request()
    jobs.check_request(request, guard)
    check_interval(body.cron, body.timezone, settings.schedule_min_interval_s)
    now = datetime.now(UTC)
    params = {
        "id": uuid.uuid4(),
        "tenant": tenant,
        "name": body.name,
        "cron": body.cron,
        "timezone": body.timezone,
        "kind": body.kind.value,
        # as sent (validated): "retain_days" omitted and null keep their two meanings
        "template": request.model_dump_json(exclude_unset=True),
        "overlap": body.overlap.value,
        "enabled": body.enabled,
        "next_run_at": next_tick(body.cron, body.timezone, now) if body.enabled else None,
    }
    row = (await conn.execute(_INSERT_SQL, params)).mappings().one()
    return _public(row)


_GET_SQL = text(f"SELECT {_COLUMNS} FROM schedules WHERE id = :id AND tenant = :tenant")


async def get_schedule(
    conn: AsyncConnection, tenant: str, schedule_id: uuid.UUID
) -> SchedulePublic:
    row = (
        (await conn.execute(_GET_SQL, {"id": schedule_id, "tenant": tenant}))
        .mappings()
        .one_or_none()
    )
    if row is None:
        raise NotFound(f"schedule {schedule_id} not found")
    return _public(row)


_LIST_SQL = text(
    f"""
SELECT {_COLUMNS} FROM schedules
WHERE tenant = :tenant
  AND (CAST(:after_at AS timestamptz) IS NULL
       OR (created_at, id) < (CAST(:after_at AS timestamptz), CAST(:after_id AS uuid)))
ORDER BY created_at DESC, id DESC
LIMIT :n
"""
)


async def list_schedules(
    conn: AsyncConnection, tenant: str, *, limit: int = 50, after: ScheduleKey | None = None
) -> tuple[list[SchedulePublic], ScheduleKey | None]:
    """Newest first; returns the page and the key to continue after (None: last page)."""
    params = {
        "tenant": tenant,
        "after_at": after[0] if after else None,
        "after_id": after[1] if after else None,
        "n": limit + 1,
    }
    rows = (await conn.execute(_LIST_SQL, params)).mappings().all()
    items = [_public(row) for row in rows[:limit]]
    if len(rows) <= limit:
        return items, None
    return items, (items[-1].created_at, items[-1].id)


async def set_enabled(
    conn: AsyncConnection, tenant: str, schedule_id: uuid.UUID, enabled: bool
) -> SchedulePublic:
    """Enable (ticks resume from now: none is made up for the time it was off) or disable
    (a tick waiting for its turn is dropped)."""
    current = await get_schedule(conn, tenant, schedule_id)
    if current.enabled == enabled:
        return current
    next_run = next_tick(current.cron, current.timezone, datetime.now(UTC)) if enabled else None
    row = (
        (
            await conn.execute(
                text(
                    f"UPDATE schedules SET enabled = :enabled, next_run_at = :next_run_at, "
                    f"pending_tick = NULL, updated_at = now() "
                    f"WHERE id = :id AND tenant = :tenant RETURNING {_COLUMNS}"
                ),
                {"id": schedule_id, "tenant": tenant, "enabled": enabled, "next_run_at": next_run},
            )
        )
        .mappings()
        .one_or_none()
    )
    if row is None:
        raise NotFound(f"schedule {schedule_id} not found")
    return _public(row)


async def delete_schedule(session: AsyncSession, tenant: str, schedule_id: uuid.UUID) -> None:
    """Delete the schedule and its run history; the jobs it submitted stay."""
    schedule = (
        await session.scalars(
            select(Schedule)
            .where(Schedule.id == schedule_id, Schedule.tenant == tenant)
            .with_for_update()
        )
    ).one_or_none()
    if schedule is None:
        raise NotFound(f"schedule {schedule_id} not found")
    await session.delete(schedule)
    await session.flush()


_RUNS_SQL = text(
    """
SELECT r.id, r.tick, r.outcome, r.job_id, r.missed, r.error, r.created_at
FROM schedule_runs r JOIN schedules s ON s.id = r.schedule_id
WHERE r.schedule_id = :id AND s.tenant = :tenant
  AND (CAST(:before AS bigint) IS NULL OR r.id < CAST(:before AS bigint))
ORDER BY r.id DESC
LIMIT :n
"""
)


async def list_runs(
    conn: AsyncConnection,
    tenant: str,
    schedule_id: uuid.UUID,
    *,
    limit: int = 50,
    before: int | None = None,
) -> tuple[list[ScheduleRunPublic], int | None]:
    """The schedule's runs, newest first; returns the page and the id to continue before."""
    await get_schedule(conn, tenant, schedule_id)
    params = {"id": schedule_id, "tenant": tenant, "before": before, "n": limit + 1}
    rows = (await conn.execute(_RUNS_SQL, params)).mappings().all()
    items = [ScheduleRunPublic.model_validate(dict(r)) for r in rows[:limit]]
    return items, (int(rows[limit - 1]["id"]) if len(rows) > limit else None)


# --------------------------------------------------------------------------------------
# The tick runner (every worker, app.utils.executor)


# THE TICK CLAIM: due schedules (or ones with a queued tick whose previous run ended),
# locked SKIP LOCKED so that concurrent workers take disjoint sets; each is handled and
# moved on inside this same transaction.
_DUE_SQL = text(
    """
SELECT s.id, s.tenant, s.cron, s.timezone, s.kind, s.template, s.overlap, s.next_run_at,
       s.pending_tick, coalesce(j.status IN ('queued', 'running'), false) AS previous_active,
       now() AS now
FROM schedules s LEFT JOIN jobs j ON j.id = s.last_job_id
WHERE s.enabled
  AND (s.next_run_at <= now()
       OR (s.pending_tick IS NOT NULL AND NOT coalesce(j.status IN ('queued', 'running'), false)))
ORDER BY s.next_run_at
LIMIT :n
FOR UPDATE OF s SKIP LOCKED
"""
)

# the tick is taken by this insert: a second run of the same tick finds the row there
_CLAIM_TICK_SQL = text(
    """
INSERT INTO schedule_runs (schedule_id, tick, outcome, missed)
VALUES (:id, :tick, 'queued', :missed)
ON CONFLICT (schedule_id, tick) DO NOTHING
RETURNING id
"""
)

_RUN_OUTCOME_SQL = text(
    "UPDATE schedule_runs SET outcome = :outcome, job_id = :job_id, error = :error "
    "WHERE schedule_id = :id AND tick = :tick"
)

_MOVE_ON_SQL = text(
    """
UPDATE schedules SET
    next_run_at = :next_run_at, pending_tick = :pending_tick,
    last_run_at = coalesce(CAST(:ran_at AS timestamptz), last_run_at),
    last_job_id = coalesce(CAST(:job_id AS uuid), last_job_id), updated_at = now()
WHERE id = :id
"""
)


async def _submit(
    session: AsyncSession, row: Mapping[Any, Any], settings: Settings, guard: SSRFGuard | None
) -> tuple[uuid.UUID | None, str | None]:
    """Submit the template's job in a savepoint; (job id, None) or (None, why not)."""
    try:
        request: JobSpecBase = template_model(JobKind(row["kind"])).model_validate(row["template"])
    except ValidationError as error:
        return None, f"the template is no longer valid: {str(error)[:400]}"
    try:
        async with session.begin_nested():
            job, _ = await jobs.submit_job(
                session,
                row["tenant"],
                request,
                guard=guard,
                default_host_limit=settings.per_host_concurrency,
                default_retain_days=settings.default_retain_days,
            )
    except TrawlerError as error:
        return None, error.detail[:500]
    except sa_exc.DBAPIError as error:
        if is_unavailable(error):
            raise
        # one schedule's bad data must not stop every schedule: recorded on its run
        logger.exception("schedule %s: submitting its job failed", row["id"])
        return None, f"submission failed: {str(error.orig)[:400]}"
    return job.id, None


async def _run_one(
    session: AsyncSession,
    conn: AsyncConnection,
    row: Mapping[Any, Any],
    settings: Settings,
    guard: SSRFGuard | None,
) -> None:
    now: datetime = row["now"]
    cron, zone = row["cron"], row["timezone"]
    overlap = ScheduleOverlap(row["overlap"])
    active: bool = row["previous_active"]
    pending: datetime | None = row["pending_tick"]
    due: datetime | None = row["next_run_at"]

    if due is None or due > now:
        # not due: a queued tick whose previous run has ended gets its turn now
        assert pending is not None
        ran, why = await _submit(session, row, settings, guard)
        await _set_outcome(conn, row["id"], pending, ran, why)
        await conn.execute(
            _MOVE_ON_SQL,
            {
                "id": row["id"],
                "next_run_at": due,
                "pending_tick": None,
                "ran_at": now if ran else None,
                "job_id": ran,
            },
        )
        return

    tick = latest_tick(cron, zone, now)
    tick = max(tick, due)
    missed = _missed_between(cron, zone, due, tick)
    next_run = next_tick(cron, zone, now)
    claimed = (
        await conn.execute(_CLAIM_TICK_SQL, {"id": row["id"], "tick": tick, "missed": missed})
    ).scalar_one_or_none()
    if claimed is None:
        # this tick already ran (cannot happen while the row lock holds; the unique index
        # is the second guard): only move on
        logger.warning("schedule %s: tick %s already ran", row["id"], tick.isoformat())
        await conn.execute(
            _MOVE_ON_SQL,
            {
                "id": row["id"],
                "next_run_at": next_run,
                "pending_tick": pending,
                "ran_at": None,
                "job_id": None,
            },
        )
        return
    if missed:
        logger.info("schedule %s: %d missed ticks folded into one run", row["id"], missed)

    job_id: uuid.UUID | None = None
    error: str | None = None
    if active and overlap == ScheduleOverlap.skip:
        outcome = "skipped"
    elif active and overlap == ScheduleOverlap.queue:
        if pending is None:
            outcome, pending = "queued", tick
        else:
            outcome = "skipped"  # one tick is already waiting
    else:
        if pending is not None:
            # the waiting tick is superseded by this one
            await _set_outcome(conn, row["id"], pending, None, None, outcome="skipped")
            pending = None
        job_id, error = await _submit(session, row, settings, guard)
        outcome = "submitted" if job_id else "error"
    await _set_outcome(conn, row["id"], tick, job_id, error, outcome=outcome)
    await conn.execute(
        _MOVE_ON_SQL,
        {
            "id": row["id"],
            "next_run_at": next_run,
            "pending_tick": pending,
            "ran_at": now if job_id else None,
            "job_id": job_id,
        },
    )


async def _set_outcome(
    conn: AsyncConnection,
    schedule_id: uuid.UUID,
    tick: datetime,
    job_id: uuid.UUID | None,
    error: str | None,
    *,
    outcome: str | None = None,
) -> None:
    if outcome is None:
        outcome = "submitted" if job_id else "error"
    await conn.execute(
        _RUN_OUTCOME_SQL,
        {"id": schedule_id, "tick": tick, "outcome": outcome, "job_id": job_id, "error": error},
    )


async def run_due(
    db: ConnectionManager, settings: Settings, guard: SSRFGuard | None, *, limit: int = 20
) -> int:
    """Handle every due tick (up to `limit` schedules) in one transaction; returns how many
    schedules were handled (`limit` means: call again)."""
    async with db.session() as session:
        conn = await session.connection()
        rows = (await conn.execute(_DUE_SQL, {"n": limit})).mappings().all()
        for row in rows:
            await _run_one(session, conn, row, settings, guard)
    return len(rows)


_PRUNE_RUNS_SQL = text(
    """
DELETE FROM schedule_runs WHERE id IN (
    SELECT id FROM schedule_runs
    WHERE created_at < now() - make_interval(days => :days) AND outcome <> 'queued'
    ORDER BY created_at LIMIT :n
)
"""
)


async def prune_runs(db: ConnectionManager, days: int, batch: int) -> int:
    """Delete run history older than `days`, in committed batches; returns rows deleted."""
    total = 0
    while True:
        async with db.connect() as conn:
            result = await conn.execute(_PRUNE_RUNS_SQL, {"days": days, "n": batch})
        deleted = int(getattr(result, "rowcount", 0) or 0)
        total += deleted
        if deleted < batch:
            return total
