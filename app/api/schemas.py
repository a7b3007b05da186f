"""Pydantic request/response models of the HTTP API (field names fixed by DESIGN.md)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.database.models import JobKind, JobStatus, ScheduleOverlap, WebhookDeliveryStatus
from app.scraper.extract import ExtractSpec
from app.scraper.urls import QueryPolicy, canonicalize_url

MAX_URLS = 10_000
MAX_URL_CHARS = 2048
MAX_HEADERS = 50
MAX_HEADER_NAME_CHARS = 256
MAX_HEADER_VALUE_CHARS = 8192
MAX_BULK_IDS = 1000

# RFC 9110 token characters: a header name anything else would be a protocol injection
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00\r\n]")
# Framing and connection-management headers belong to the HTTP client, not to the job:
# letting a job set them would desynchronise the connection or defeat keep-alive.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    }
)


def _check_url(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("URL is empty")
    try:
        canonicalize_url(value)
    except ValueError as error:
        raise ValueError(f"invalid URL {value[:200]!r}: {error}") from None
    return value


HttpUrlStr = Annotated[
    str, Field(min_length=1, max_length=MAX_URL_CHARS), AfterValidator(_check_url)
]
"""An absolute http(s) URL with a host that app.scraper.urls can canonicalize."""


def check_regex(value: str) -> str:
    """`value` if it compiles, else ValueError. Besides re.error, the compiler raises
    OverflowError for a repeat count beyond its limit (`a{9999999999}`) and RecursionError
    for groups nested some hundreds deep: bad input all the same, never a 500."""
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as error:
        raise ValueError(f"invalid regular expression {value[:200]!r}: {error}") from None
    return value


Regex = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(check_regex)]


class _Strict(BaseModel):
    # unknown fields are a client bug (a typo like "extarct" would silently do nothing)
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------
# Requests


class FetchOptions(_Strict):
    timeout_s: float = Field(default=30, ge=1, le=300, description="total budget per fetch")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers")
    user_agent: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        if len(headers) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        for name, value in headers.items():
            if not (0 < len(name) <= MAX_HEADER_NAME_CHARS) or not _HEADER_NAME.match(name):
                raise ValueError(f"invalid header name {name[:80]!r}")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is managed by the HTTP client")
            if len(value) > MAX_HEADER_VALUE_CHARS or _HEADER_VALUE_FORBIDDEN.search(value):
                raise ValueError(
                    f"header {name!r}: value must be at most {MAX_HEADER_VALUE_CHARS} "
                    "characters without CR, LF or NUL"
                )
        return headers

    @field_validator("user_agent")
    @classmethod
    def _check_user_agent(cls, value: str | None) -> str | None:
        if value is not None and _HEADER_VALUE_FORBIDDEN.search(value):
            raise ValueError("user_agent must not contain CR, LF or NUL")
        return value


WebhookEvent = Literal["job.started", "job.page", "job.completed", "job.failed", "job.cancelled"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = (
    "job.started",
    "job.completed",
    "job.failed",
    "job.cancelled",
)
# set by the delivery itself (app.services.webhooks); a job may not override them
_WEBHOOK_RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "user-agent",
        "trawler-signature",
        "trawler-event",
        "trawler-webhook-id",
        "trawler-delivery-attempt",
    }
)


class WebhookSpec(_Strict):
    """Where a job's events are POSTed. `job.page` (one event per stored page) is opt-in."""

    url: HttpUrlStr
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1, max_length=5
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra request headers (e.g. an Authorization)"
    )
    secret: str | None = Field(
        default=None,
        min_length=16,
        max_length=256,
        pattern=r"^[^\x00]+$",  # the database cannot store a NUL
        description="HMAC-SHA256 key: every delivery carries a Trawler-Signature header",
    )

    @field_validator("events")
    @classmethod
    def _unique_events(cls, events: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(events))

    @field_validator("headers")
    @classmethod
    def _check_webhook_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        FetchOptions._check_headers(headers)
        for name in headers:
            if name.lower() in _WEBHOOK_RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the webhook delivery")
        return headers

    def public(self) -> dict[str, Any]:
        """What the job's spec shows of it: no secret, no header values."""
        return {"url": self.url, "events": list(self.events)}


class JobSpecBase(_Strict):
    """What every job kind shares: extraction, priority, retries, fetch options."""

    extract: ExtractSpec = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-100, le=100)
    max_attempts: int = Field(default=3, ge=1, le=20)
    options: FetchOptions = Field(default_factory=FetchOptions)
    webhook: WebhookSpec | None = None
    retain_days: int | None = Field(
        default=None,
        ge=0,
        le=36500,
        description="days the finished job is kept; omitted: the server default; null: forever",
    )

    # kept out of jobs.spec: the webhook has its own table (its secret is never shown),
    # retain_days its own column
    _NOT_IN_SPEC: ClassVar[frozenset[str]] = frozenset({"webhook", "retain_days"})

    kind: ClassVar[JobKind]

    def start_urls(self) -> list[str]:
        """The URLs that become the job's first tasks (depth 0)."""
        raise NotImplementedError

    def stored_spec(self) -> dict[str, Any]:
        """The spec kept in jobs.spec (and shown back in JobPublic.spec)."""
        raise NotImplementedError

    def _with_webhook(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.webhook is not None:
            spec["webhook"] = self.webhook.public()
        return spec


class ScrapeCreate(JobSpecBase):
    kind: ClassVar[JobKind] = JobKind.scrape
    urls: Annotated[list[HttpUrlStr], Field(min_length=1, max_length=MAX_URLS)]

    def start_urls(self) -> list[str]:
        return self.urls

    def stored_spec(self) -> dict[str, Any]:
        # The URL list lives in the tasks table; copying up to 10,000 URLs into every job
        # read (GET /jobs lists 50 of them) would make the hot reads pay for it.
        spec = self.model_dump(mode="json", exclude={"urls", *self._NOT_IN_SPEC})
        spec["url_count"] = len(self.urls)
        return self._with_webhook(spec)


class FollowRules(_Strict):
    same_site: bool = True
    allow_subdomains: bool = False
    include: list[Regex] = Field(default_factory=list, max_length=100)
    exclude: list[Regex] = Field(default_factory=list, max_length=100)
    max_depth: int = Field(default=3, ge=0, le=100)
    max_pages: int = Field(default=1000, ge=1, le=1_000_000)
    sitemaps: bool = False
    follow_nofollow: bool = False
    # False | True (drop the query) | "sort" | "tracking" | ["utm_*", "sessionid", ...]
    ignore_query: bool | Literal["sort", "tracking"] | list[str] = False

    @field_validator("ignore_query")
    @classmethod
    def _check_ignore_query(cls, value: Any) -> Any:
        QueryPolicy.parse(value)  # raises ValueError with a clear message
        return value


class Politeness(_Strict):
    respect_robots: bool = True
    per_host_concurrency: int = Field(default=4, ge=1, le=64)
    delay_ms: int = Field(default=0, ge=0, le=60_000)


class CrawlCreate(JobSpecBase):
    kind: ClassVar[JobKind] = JobKind.crawl
    seeds: Annotated[list[HttpUrlStr], Field(min_length=1, max_length=1000)]
    follow: FollowRules = Field(default_factory=FollowRules)
    politeness: Politeness = Field(default_factory=Politeness)

    def start_urls(self) -> list[str]:
        return self.seeds

    def stored_spec(self) -> dict[str, Any]:
        return self._with_webhook(self.model_dump(mode="json", exclude=set(self._NOT_IN_SPEC)))


class PreviewCreate(_Strict):
    """POST /scrape/preview: one URL fetched and extracted inline, nothing stored."""

    url: HttpUrlStr
    extract: ExtractSpec = Field(default_factory=dict)
    options: FetchOptions = Field(default_factory=FetchOptions)


BulkAction = Literal["cancel", "delete", "retry"]


class BulkJobsCreate(_Strict):
    action: BulkAction
    ids: Annotated[list[uuid.UUID], Field(min_length=1, max_length=MAX_BULK_IDS)]


def _check_cron(value: str) -> str:
    value = " ".join(value.split())
    try:
        next(CronSim(value, datetime.now(UTC)))
    except (CronSimError, StopIteration, ValueError) as error:
        raise ValueError(
            f"invalid cron expression {value!r}: {error or 'no future time matches'}; "
            "use 5 fields (minute hour day month weekday) or 6 (seconds first)"
        ) from None
    return value


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {value!r} (an IANA name such as Europe/Paris)"
        ) from None
    return value


def template_model(kind: JobKind) -> type[JobSpecBase]:
    return ScrapeCreate if kind == JobKind.scrape else CrawlCreate


class ScheduleCreate(_Strict):
    """POST /schedules: submit `template` (a POST /scrape or /crawl body) at every tick."""

    name: str | None = Field(default=None, min_length=1, max_length=128)
    cron: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_check_cron)]
    timezone: Annotated[
        str, Field(min_length=1, max_length=64), AfterValidator(_check_timezone)
    ] = "UTC"
    kind: JobKind
    template: dict[str, Any]
    overlap: ScheduleOverlap = Field(
        default=ScheduleOverlap.skip,
        description="while the previous run is active: skip the tick, queue one run for "
        "when it ends, or allow runs side by side",
    )
    enabled: bool = True

    @model_validator(mode="after")
    def _check_template(self) -> ScheduleCreate:
        self.job_request()
        return self

    def job_request(self) -> JobSpecBase:
        """The template as the request it stands for (ValueError when it is not valid)."""
        try:
            return template_model(self.kind).model_validate(self.template)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise ValueError(
                f"template is not a valid {self.kind.value} request: "
                f"{where or 'body'}: {first.get('msg', 'invalid')}"
            ) from None


# --------------------------------------------------------------------------------------
# Responses


class ProgressPublic(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int


class JobPublic(BaseModel):
    id: uuid.UUID
    kind: JobKind
    status: JobStatus
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressPublic
    error: str | None
    spec: dict[str, Any]


class PagePublic(BaseModel):
    url: str
    final_url: str | None
    status_code: int | None
    ok: bool
    depth: int
    fetched_at: datetime
    elapsed_ms: int | None
    data: dict[str, Any]
    error: str | None


class PreviewPublic(BaseModel):
    url: str
    final_url: str | None
    status_code: int | None
    ok: bool
    elapsed_ms: int | None
    data: dict[str, Any]
    error: str | None


T = TypeVar("T")


class CursorPage(BaseModel, Generic[T]):
    """One page of a keyset-paginated list; pass next_cursor back to get the next one."""

    items: list[T]
    next_cursor: str | None


BulkOutcome = Literal["ok", "not_found", "conflict"]


class BulkItemPublic(BaseModel):
    id: uuid.UUID
    outcome: BulkOutcome
    status: JobStatus | None = Field(default=None, description="job status after the action")
    detail: str | None = None


class BulkResultPublic(BaseModel):
    action: BulkAction
    results: list[BulkItemPublic]
    counts: dict[BulkOutcome, int]


class WebhookPublic(BaseModel):
    url: str
    events: list[str]
    headers: list[str] = Field(description="names of the extra headers sent (values hidden)")
    signed: bool = Field(description="whether deliveries carry a Trawler-Signature")


class WebhookDeliveryPublic(BaseModel):
    id: int
    event_id: uuid.UUID
    event: str
    status: WebhookDeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = Field(description="when the next attempt is due")
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    redelivery_of: int | None
    created_at: datetime


class WebhookLogPublic(BaseModel):
    """A job's webhook and its deliveries, newest first."""

    webhook: WebhookPublic | None
    items: list[WebhookDeliveryPublic]
    next_cursor: str | None


class SchedulePublic(BaseModel):
    id: uuid.UUID
    name: str | None
    cron: str
    timezone: str
    kind: JobKind
    template: dict[str, Any] = Field(description="the job template; a webhook secret is hidden")
    overlap: ScheduleOverlap
    enabled: bool
    next_run_at: datetime | None
    next_runs: list[datetime] = Field(description="the next few tick times (UTC)")
    pending_tick: datetime | None = Field(
        description="overlap=queue: the tick waiting for the previous run to end"
    )
    last_run_at: datetime | None
    last_job_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class ScheduleRunPublic(BaseModel):
    tick: datetime
    outcome: Literal["submitted", "skipped", "queued", "error"]
    job_id: uuid.UUID | None
    missed: int = Field(description="ticks missed (downtime) and folded into this one")
    error: str | None
    created_at: datetime
