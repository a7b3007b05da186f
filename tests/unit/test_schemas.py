"""Request/response schemas, cursors and key formats: pure validation, no database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from app.api.errors import Unprocessable
from app.api.routes.common import (
    decode_job_cursor,
    decode_page_cursor,
    encode_cursor,
    encode_job_cursor,
    encode_page_cursor,
    parse_statuses,
)
from app.api.schemas import (
    BulkJobsCreate,
    CrawlCreate,
    CursorPage,
    FetchOptions,
    JobPublic,
    PreviewCreate,
    ScrapeCreate,
)
from app.database.models import JobKind, JobStatus, KeyRole
from app.services import apikeys
from app.services.jobs import request_hash


def errors_of(model: type[Any], data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return str(caught.value)


# --------------------------------------------------------------------------------------
# ScrapeCreate


def test_scrape_defaults_match_the_contract() -> None:
    request = ScrapeCreate.model_validate({"urls": ["https://shop.example/p/1"]})
    assert request.extract == {}
    assert request.priority == 0
    assert request.max_attempts == 3
    assert request.options.timeout_s == 30
    assert request.options.headers == {}
    assert request.options.user_agent is None
    assert request.kind == JobKind.scrape
    assert "kind" not in request.model_dump()


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example/p/1",
        "http://shop.example:8080/a?b=c#frag",
        "https://bücher.example/",
        "  https://padded.example/  ",
        "http://[2001:db8::1]/",
    ],
)
def test_good_urls(url: str) -> None:
    assert ScrapeCreate.model_validate({"urls": [url]}).urls == [url.strip()]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://files.example/", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("//no-scheme.example/", "only http and https"),
        ("http://", "no host"),
        ("http://user:pw@host.example/", "credentials"),
        ("http://host.example:70000/", "invalid URL"),
        ("", "at least 1 character"),
        ("https://a.example/" + "a" * 2040, "at most 2048 characters"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    assert message in errors_of(ScrapeCreate, {"urls": [url]})


def test_url_count_limits() -> None:
    assert "at least 1 item" in errors_of(ScrapeCreate, {"urls": []})
    ok = ScrapeCreate.model_validate({"urls": [f"https://a.example/{i}" for i in range(10_000)]})
    assert len(ok.urls) == 10_000
    too_many = {"urls": [f"https://a.example/{i}" for i in range(10_001)]}
    assert "at most 10000 items" in errors_of(ScrapeCreate, too_many)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"priority": -101}, "greater than or equal to -100"),
        ({"priority": 101}, "less than or equal to 100"),
        ({"max_attempts": 21}, "less than or equal to 20"),
        ({"options": {"timeout_s": 0.5}}, "greater than or equal to 1"),
        ({"options": {"timeout_s": 301}}, "less than or equal to 300"),
        ({"options": {"retries": 3}}, "Extra inputs are not permitted"),
        ({"kind": "crawl"}, "Extra inputs are not permitted"),
        ({"extract": {"1bad": {"css": "h1"}}}, "String should match pattern"),
        ({"extract": {"t": {"css": "a:nth-child("}}}, "invalid CSS selector"),
        ({"extract": {"t": {"xpath": "//a[@"}}}, "invalid XPath selector"),
        ({"extract": {"t": {"css": "a", "value": "attr:"}}}, "attr:<name>"),
        ({"extract": {"t": {"css": "a", "value": "href"}}}, "attr:<name>"),
        ({"extract": {"t": {}}}, "exactly one of 'css'"),
        ({"extract": {f"f{i}": {"css": "a"} for i in range(101)}}, "at most 100"),
    ],
)
def test_scrape_field_limits(extra: dict[str, Any], message: str) -> None:
    assert message in errors_of(ScrapeCreate, {"urls": ["https://a.example/"], **extra})


def test_extract_spec_values() -> None:
    request = ScrapeCreate.model_validate(
        {
            "urls": ["https://a.example/"],
            "extract": {
                "title": {"css": "h1", "value": "text"},
                "links": {"xpath": "//a", "value": "attr:HREF", "all": True},
                "body": {"css": "main", "value": "html"},
            },
        }
    )
    assert request.extract["links"].value == "attr:href"
    assert request.extract["links"].all is True
    assert request.extract["title"].engine == "css"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Bad Name": "x"}, "invalid header name"),
        ({"X-A": "line\nbreak"}, "without CR, LF or NUL"),
        ({"X-A": "v" * 8193}, "at most 8192"),
        ({"Content-Length": "1"}, "managed by the HTTP client"),
        ({"transfer-encoding": "chunked"}, "managed by the HTTP client"),
        ({f"X-{i}": "v" for i in range(51)}, "at most 50 headers"),
    ],
)
def test_header_limits(headers: dict[str, str], message: str) -> None:
    assert message in errors_of(FetchOptions, {"headers": headers})


def test_user_agent_cannot_inject_headers() -> None:
    assert "CR, LF or NUL" in errors_of(FetchOptions, {"user_agent": "UA\r\nX-Evil: 1"})
    assert FetchOptions.model_validate({"user_agent": "Bot/1.0"}).user_agent == "Bot/1.0"


def test_stored_spec_leaves_the_url_list_to_the_tasks() -> None:
    request = ScrapeCreate.model_validate(
        {"urls": ["https://a.example/1", "https://a.example/2"], "priority": 5}
    )
    spec = request.stored_spec()
    assert "urls" not in spec
    assert spec["url_count"] == 2
    assert spec["priority"] == 5
    assert spec["options"] == {"timeout_s": 30.0, "headers": {}, "user_agent": None}


def test_request_hash_is_canonical() -> None:
    a = ScrapeCreate.model_validate({"urls": ["https://a.example/"], "priority": 1})
    b = ScrapeCreate.model_validate(
        {"priority": 1, "max_attempts": 3, "options": {}, "urls": ["https://a.example/"]}
    )
    c = ScrapeCreate.model_validate({"urls": ["https://a.example/"], "priority": 2})
    assert request_hash(a) == request_hash(b)
    assert request_hash(a) != request_hash(c)
    assert len(request_hash(a)) == 64


# --------------------------------------------------------------------------------------
# CrawlCreate, preview, bulk


def test_crawl_defaults_match_the_contract() -> None:
    crawl = CrawlCreate.model_validate({"seeds": ["https://shop.example/"]})
    assert crawl.kind == JobKind.crawl
    assert crawl.start_urls() == ["https://shop.example/"]
    # the contract's fields with its defaults, plus the options Trawler adds
    assert crawl.follow.model_dump() == {
        "same_site": True,
        "allow_subdomains": False,
        "follow_nofollow": False,
        "ignore_query": False,
        "include": [],
        "exclude": [],
        "max_depth": 3,
        "max_pages": 1000,
        "sitemaps": False,
    }
    assert crawl.politeness.model_dump() == {
        "respect_robots": True,
        "per_host_concurrency": 4,
        "delay_ms": 0,
    }
    assert crawl.stored_spec()["seeds"] == ["https://shop.example/"]
    scrape = ScrapeCreate.model_validate({"urls": ["https://shop.example/"]})
    assert request_hash(crawl) != request_hash(scrape)


def test_crawl_rejects_bad_rules() -> None:
    base = {"seeds": ["https://shop.example/"]}
    assert "invalid regular expression" in errors_of(
        CrawlCreate, {**base, "follow": {"include": ["(unclosed"]}}
    )
    assert "Extra inputs" in errors_of(CrawlCreate, {**base, "urls": ["https://a.example/"]})
    assert "seeds" in errors_of(CrawlCreate, {})
    assert "greater than or equal to 1" in errors_of(
        CrawlCreate, {**base, "politeness": {"per_host_concurrency": 0}}
    )


def test_preview_and_bulk() -> None:
    assert PreviewCreate.model_validate({"url": "https://a.example/"}).options.timeout_s == 30
    assert "only http and https" in errors_of(PreviewCreate, {"url": "gopher://a.example/"})
    assert "Input should be 'cancel', 'delete' or 'retry'" in errors_of(
        BulkJobsCreate, {"action": "purge", "ids": [str(uuid.uuid4())]}
    )
    too_many = {"action": "cancel", "ids": [str(uuid.uuid4()) for _ in range(1001)]}
    assert "at most 1000 items" in errors_of(BulkJobsCreate, too_many)


def test_job_public_shape() -> None:
    now = datetime.now(UTC)
    job = JobPublic.model_validate(
        {
            "id": uuid.uuid4(),
            "kind": "scrape",
            "status": "queued",
            "priority": 0,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "progress": {"total": 1, "queued": 1, "running": 0, "succeeded": 0, "failed": 0},
            "error": None,
            "spec": {},
        }
    )
    assert list(job.model_dump()) == [
        "id",
        "kind",
        "status",
        "priority",
        "created_at",
        "started_at",
        "finished_at",
        "progress",
        "error",
        "spec",
    ]
    page = CursorPage[JobPublic](items=[job], next_cursor=None)
    assert set(page.model_dump()) == {"items", "next_cursor"}


# --------------------------------------------------------------------------------------
# Cursors and filters


def test_job_cursor_round_trip() -> None:
    key = (datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), uuid.uuid4())
    cursor = encode_job_cursor(key)
    assert cursor is not None and "=" not in cursor
    assert decode_job_cursor(cursor) == key
    assert encode_job_cursor(None) is None
    assert decode_job_cursor(None) is None


@pytest.mark.parametrize(
    "cursor",
    [
        "***",
        encode_cursor("2026-01-01T00:00:00", str(uuid.uuid4())),  # no time zone
        encode_cursor("not a date", str(uuid.uuid4())),
        encode_cursor("2026-01-01T00:00:00+00:00", "not-a-uuid"),
        encode_cursor(1),
    ],
)
def test_bad_job_cursors(cursor: str) -> None:
    with pytest.raises(Unprocessable, match="invalid cursor"):
        decode_job_cursor(cursor)


def test_page_cursor() -> None:
    assert decode_page_cursor(encode_page_cursor(41)) == 41
    assert decode_page_cursor(None) == 0
    assert encode_page_cursor(None) is None
    for bad in (encode_cursor(-1), encode_cursor(2**63), encode_cursor("1"), "%%"):
        with pytest.raises(Unprocessable):
            decode_page_cursor(bad)


def test_parse_statuses() -> None:
    assert parse_statuses(["queued,running", "failed"]) == [
        JobStatus.queued,
        JobStatus.running,
        JobStatus.failed,
    ]
    assert parse_statuses(None) == []
    with pytest.raises(Unprocessable, match="unknown status 'done'"):
        parse_statuses(["done"])


# --------------------------------------------------------------------------------------
# API key format and cache


def test_key_format_and_prefix() -> None:
    key = f"trw_{'A1b2C3d4'}_{'x' * 40}"
    assert apikeys.parse_prefix(key) == "A1b2C3d4"
    assert apikeys.parse_prefix("trw_short_" + "x" * 40) is None
    assert apikeys.parse_prefix("trw_A1b2C3d4_" + "x" * 31) is None  # secret too short
    assert apikeys.parse_prefix("trw_A1b2C3d4_" + "x-" * 20) is None  # not base62
    assert apikeys.hash_key(key) == apikeys.hash_key(key)
    assert len(apikeys.hash_key(key)) == 64


def test_key_cache_forgets_revoked_keys() -> None:
    cache = apikeys._KeyCache()
    principal = apikeys.Principal(key_id=uuid.uuid4(), tenant="t", role=KeyRole.user)
    cache.put("h1", principal)
    assert cache.get("h1") == principal
    assert cache.get("h2") is None
    cache.discard_key(principal.key_id)
    assert cache.get("h1") is None
    assert not principal.is_admin
