"""Pydantic request/response models of the HTTP API (field names fixed by DESIGN.md)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.database.models import JobKind, JobStatus
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


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"invalid regular expression {value!r}: {error}") from None
    return value


Regex = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_check_regex)]


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


class JobSpecBase(_Strict):
    """What every job kind shares: extraction, priority, retries, fetch options."""

    extract: ExtractSpec = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-100, le=100)
    max_attempts: int = Field(default=3, ge=1, le=20)
    options: FetchOptions = Field(default_factory=FetchOptions)

    kind: ClassVar[JobKind]

    def start_urls(self) -> list[str]:
        """The URLs that become the job's first tasks (depth 0)."""
        raise NotImplementedError

    def stored_spec(self) -> dict[str, Any]:
        """The spec kept in jobs.spec (and shown back in JobPublic.spec)."""
        raise NotImplementedError


class ScrapeCreate(JobSpecBase):
    kind: ClassVar[JobKind] = JobKind.scrape
    urls: Annotated[list[HttpUrlStr], Field(min_length=1, max_length=MAX_URLS)]

    def start_urls(self) -> list[str]:
        return self.urls

    def stored_spec(self) -> dict[str, Any]:
        # The URL list lives in the tasks table; copying up to 10,000 URLs into every job
        # read (GET /jobs lists 50 of them) would make the hot reads pay for it.
        spec = self.model_dump(mode="json", exclude={"urls"})
        spec["url_count"] = len(self.urls)
        return spec


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
        return self.model_dump(mode="json")


class PreviewCreate(_Strict):
    """POST /scrape/preview: one URL fetched and extracted inline, nothing stored."""

    url: HttpUrlStr
    extract: ExtractSpec = Field(default_factory=dict)
    options: FetchOptions = Field(default_factory=FetchOptions)


BulkAction = Literal["cancel", "delete", "retry"]


class BulkJobsCreate(_Strict):
    action: BulkAction
    ids: Annotated[list[uuid.UUID], Field(min_length=1, max_length=MAX_BULK_IDS)]


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
