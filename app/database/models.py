"""SQLAlchemy 2.0 typed models: jobs, tasks (the frontier), pages, events, workers, keys,
tenant limits, the admin audit trail, webhooks (config and outbox), schedules."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        uuid.UUID: UUID(as_uuid=True),
    }


class JobKind(enum.StrEnum):
    scrape = "scrape"
    crawl = "crawl"


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_JOB_STATUSES = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})


# tasks.fillfactor: room in each page for the HOT update that ends a task
TASKS_FILLFACTOR = 80


class TaskStatus(enum.StrEnum):
    queued = "queued"
    leased = "leased"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"


class WorkerState(enum.StrEnum):
    running = "running"
    draining = "draining"
    stopped = "stopped"


class KeyRole(enum.StrEnum):
    user = "user"
    admin = "admin"


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # VARCHAR + CHECK (not a native PG enum): adding a value is a plain migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def _now() -> Any:
    return mapped_column(server_default=func.now())


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(128))
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), server_default=JobStatus.queued.value
    )
    priority: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    max_attempts: Mapped[int] = mapped_column(SmallInteger, server_default="3")
    spec: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # progress counters: maintained in the same statements that move tasks
    total: Mapped[int] = mapped_column(Integer, server_default="0")
    queued: Mapped[int] = mapped_column(Integer, server_default="0")
    running: Mapped[int] = mapped_column(Integer, server_default="0")
    succeeded: Mapped[int] = mapped_column(Integer, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, server_default="0")
    # tasks not fetched on purpose (robots.txt, scope decided at fetch time)
    skipped: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # retention: days a finished job is kept (NULL: forever); expires_at is set from it
    # when the job reaches a terminal state (app.services.state) and cleared on a reopen
    retain_days: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[datetime | None]

    tasks: Mapped[list[Task]] = relationship(
        back_populates="job", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        CheckConstraint("priority BETWEEN -100 AND 100", name="priority_range"),
        CheckConstraint("max_attempts BETWEEN 1 AND 20", name="max_attempts_range"),
        CheckConstraint(
            "total >= 0 AND queued >= 0 AND running >= 0 AND succeeded >= 0 AND failed >= 0"
            " AND skipped >= 0",
            name="counters_nonneg",
        ),
        # keyset pagination of a tenant's jobs, newest first
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index(
            "uq_jobs_tenant_idempotency_key",
            "tenant",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("ix_jobs_status_finished", "status", "finished_at"),
    )


class Task(Base):
    """One URL of a job. While it is to be done (status queued) it has a row in
    `task_queue`, which holds its place in the queue and its lease; finished, only this row
    is left, with the outcome (migration 0008).

    None of the columns the executor writes (status, attempts, last_error, updated_at) is
    in an index, so the completion's update of a task is a HOT update (no index entry
    written) whenever the row's page has room; the fillfactor leaves some in each page.
    """

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    # sha256 of the canonical URL: per-job dedupe by a unique index, not a set in memory
    url_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    host: Mapped[str] = mapped_column(String(255))
    depth: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    priority: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    # queued (waiting or leased: see task_queue), succeeded, failed, skipped, cancelled;
    # 'leased' is only found in rows of schemas before 0008
    status: Mapped[TaskStatus] = mapped_column(
        _enum(TaskStatus, "task_status"), server_default=TaskStatus.queued.value
    )
    # attempts made: kept in task_queue while queued, written here as the task ends
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    max_attempts: Mapped[int] = mapped_column(SmallInteger, server_default="3")
    next_attempt_at: Mapped[datetime] = _now()
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    job: Mapped[Job] = relationship(back_populates="tasks", lazy="raise")

    __table_args__ = (
        # also serves every per-job scan of tasks (led by job_id)
        Index("uq_tasks_job_url_hash", "job_id", "url_hash", unique=True),
        {"postgresql_with": {"fillfactor": TASKS_FILLFACTOR}},
    )


class TaskQueue(Base):
    """The queue: one row per task to be done, waiting (no lease) or leased to a worker.

    A row is added when its task is inserted queued (a trigger on tasks, migration 0008) or
    re-queued (retry, resume), and deleted when its task ends: the claim and the lease's
    end touch only this narrow table's small indexes, not the wide tasks table's.
    `attempts` counts the claims so far; `leased_at` is when the current lease began (a
    renewal moves only its expiry). `fetched_at` is set while leased once the task's
    requests are over (parsing, storing): the claim no longer counts it against its host.
    """

    __tablename__ = "task_queue"

    task_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    host: Mapped[str] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(SmallInteger)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    lease_owner: Mapped[uuid.UUID | None]
    lease_expires_at: Mapped[datetime | None]
    leased_at: Mapped[datetime | None]
    fetched_at: Mapped[datetime | None]

    __table_args__ = (
        # the claim: waiting rows only, per host (a skip scan finds the hosts with work),
        # best priority first, then due time, then FIFO
        Index(
            "ix_task_queue_claim",
            "host",
            text("priority DESC"),
            "next_attempt_at",
            "task_id",
            postgresql_where=text("lease_owner IS NULL"),
        ),
        # leased rows per host (fetches in flight, cluster-wide); lease recovery reads all
        # of them (a few per worker slot). lease_expires_at is in no index: a renewal is a
        # HOT update
        Index("ix_task_queue_leased", "host", postgresql_where=text("lease_owner IS NOT NULL")),
        # a job's waiting tasks (its cancellation; the leased ones it finds through
        # ix_task_queue_leased). Leased rows are left out so that a claim does not write
        # into this index too
        Index("ix_task_queue_job_id", "job_id", postgresql_where=text("lease_owner IS NULL")),
        CheckConstraint(
            "(lease_owner IS NULL) = (lease_expires_at IS NULL)", name="lease_has_expiry"
        ),
    )


class Page(Base):
    """The stored result of one task: exactly one row per task."""

    __tablename__ = "pages"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tasks.id", ondelete="CASCADE"), unique=True
    )
    url: Mapped[str] = mapped_column(Text)
    final_url: Mapped[str | None] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    ok: Mapped[bool] = mapped_column(Boolean)
    depth: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    content_type: Mapped[str | None] = mapped_column(String(255))
    elapsed_ms: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    error: Mapped[str | None] = mapped_column(Text)
    fetched_at: Mapped[datetime] = _now()

    __table_args__ = (Index("ix_pages_job_id_id", "job_id", "id"),)


class JobEvent(Base):
    """One row per job status change or progress milestone: feeds SSE and the audit trail."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    status: Mapped[JobStatus | None] = mapped_column(_enum(JobStatus, "event_job_status"))
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _now()

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    concurrency: Mapped[int] = mapped_column(Integer)
    in_flight: Mapped[int] = mapped_column(Integer, server_default="0")
    state: Mapped[WorkerState] = mapped_column(
        _enum(WorkerState, "worker_state"), server_default=WorkerState.running.value
    )
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = _now()
    heartbeat_at: Mapped[datetime] = _now()


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(128))
    role: Mapped[KeyRole] = mapped_column(_enum(KeyRole, "key_role"))
    # the first characters of the key, for lookup; the whole key is only stored hashed
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = _now()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Host(Base):
    """Cluster-wide politeness and robots.txt cache for one host (host[:port]).

    `leased` counts this host's tasks leased right now; the claim grants at most
    `max_concurrency - leased` more and spaces fetch starts by `delay_ms` through
    `next_fetch_at`, so the limits hold across every worker process.
    """

    __tablename__ = "hosts"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    max_concurrency: Mapped[int] = mapped_column(SmallInteger, server_default="8")
    delay_ms: Mapped[int] = mapped_column(Integer, server_default="0")
    leased: Mapped[int] = mapped_column(Integer, server_default="0")
    last_grant: Mapped[int] = mapped_column(Integer, server_default="0")
    next_fetch_at: Mapped[datetime] = _now()
    blocked_until: Mapped[datetime] = _now()
    robots: Mapped[dict[str, Any] | None]
    # Crawl-delay from robots.txt; the spacing used is the larger of this and delay_ms
    robots_delay_ms: Mapped[int] = mapped_column(Integer, server_default="0")
    robots_expires_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("leased >= 0", name="leased_nonneg"),
        CheckConstraint("max_concurrency >= 1", name="concurrency_positive"),
    )


class ClusterState(Base):
    """A single row of cluster-wide switches (pause claiming)."""

    __tablename__ = "cluster_state"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="1")
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)


# A tenant's active jobs, counted on every submission against TRAWLER_TENANT_MAX_ACTIVE_JOBS
# (declared beside Job rather than in it: the jobs table's other indexes predate it)
Index(
    "ix_jobs_tenant_active",
    Job.tenant,
    postgresql_where=text("status IN ('queued', 'running')"),
)


class TenantLimit(Base):
    """Submission rate state of one tenant, shared by every API process.

    `tat` is the theoretical arrival time of the generic cell rate algorithm: a submission
    is admitted while `tat - now()` stays within the burst allowance, and moves `tat` one
    emission interval (1 / rate) on.
    """

    __tablename__ = "tenant_limits"
    # UNLOGGED: rate state need not survive a crash (it is emptied then: every tenant starts
    # with a full burst), and a transaction that only touched it commits without waiting
    # for a WAL flush, so the admission before each submission costs no extra fsync
    __table_args__ = {"prefixes": ["UNLOGGED"]}

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    tat: Mapped[datetime] = _now()


class AdminAudit(Base):
    """One row per admin action: who did what to what, with which outcome."""

    __tablename__ = "admin_audit"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = _now()
    key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    tenant: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    result: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    ok: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    request_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_admin_audit_created_at", "created_at"),)


# The retention purge walks expired jobs in expiry order (app.services.retention)
Index("ix_jobs_expires_at", Job.expires_at, postgresql_where=text("expires_at IS NOT NULL"))


class JobWebhook(Base):
    """A job's webhook: where its events go and how they are signed (one per job).

    Kept apart from jobs.spec so that the secret and the headers never appear in a job
    resource; the API shows the URL and the events only.
    """

    __tablename__ = "job_webhooks"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    headers: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    secret: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = _now()


class WebhookDeliveryStatus(enum.StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class WebhookDelivery(Base):
    """The transactional outbox: one row per event to deliver, written in the transaction
    that made the event happen, delivered at least once by any worker (SKIP LOCKED)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # what receivers deduplicate on: a redelivery keeps the event id of its original
    event_id: Mapped[uuid.UUID] = mapped_column(server_default=func.gen_random_uuid())
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    status: Mapped[WebhookDeliveryStatus] = mapped_column(
        _enum(WebhookDeliveryStatus, "webhook_delivery_status"),
        server_default=WebhookDeliveryStatus.pending.value,
    )
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    # due time while pending; a claimed delivery is pushed a lease ahead, so a worker that
    # dies mid-request leaves it due again (at least once)
    next_attempt_at: Mapped[datetime] = _now()
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]
    redelivery_of: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        # the delivery claim: due pending rows only
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # a job's delivery log, and deleting a job's deliveries in batches
        Index("ix_webhook_deliveries_job_id_id", "job_id", "id"),
        CheckConstraint("attempts >= 0", name="attempts_nonneg"),
    )


class ScheduleOverlap(enum.StrEnum):
    skip = "skip"
    queue = "queue"
    allow = "allow"


class Schedule(Base):
    """A cron schedule that submits a job from its template at every tick.

    Ticks are claimed through this row (FOR UPDATE SKIP LOCKED, next_run_at moved on in
    the same transaction as the job insert), and schedule_runs is unique per tick: one run
    per tick whatever the number of workers.
    """

    __tablename__ = "schedules"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str | None] = mapped_column(String(128))
    cron: Mapped[str] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64), server_default="UTC")
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "schedule_kind"))
    # the request body of POST /scrape or /crawl (validated), secrets included
    template: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    overlap: Mapped[ScheduleOverlap] = mapped_column(
        _enum(ScheduleOverlap, "schedule_overlap"), server_default=ScheduleOverlap.skip.value
    )
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    next_run_at: Mapped[datetime | None]
    # overlap "queue": the tick waiting for the previous run to end (at most one waits)
    pending_tick: Mapped[datetime | None]
    last_run_at: Mapped[datetime | None]
    # no foreign key: a purged job simply is no longer active
    last_job_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        Index("ix_schedules_tenant_created", "tenant", "created_at", "id"),
        # the tick claim: enabled schedules by due time
        Index("ix_schedules_due", "next_run_at", postgresql_where=text("enabled")),
    )


class ScheduleRun(Base):
    """What one tick of a schedule did: submitted a job, skipped, queued, or failed."""

    __tablename__ = "schedule_runs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    schedule_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    tick: Mapped[datetime]
    outcome: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[uuid.UUID | None]
    # ticks missed during downtime and folded into this run
    missed: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        # exactly one run per tick, backed by the database
        Index("uq_schedule_runs_schedule_id_tick", "schedule_id", "tick", unique=True),
        Index("ix_schedule_runs_created_at", "created_at"),
    )
