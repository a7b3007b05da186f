"""Export (GET /api/v1/export/jobs/{id}) against the real database: every format parsed
back with a real parser, filters, running jobs, snapshots, disconnects, outages."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import random
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openpyxl
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from openpyxl.utils.escape import unescape
from sqlalchemy import text

from app.config import Settings
from app.database.connection import ConnectionManager
from app.main import create_app
from app.services import export as export_service
from app.utils.executor import AsyncJobExecutor
from tests.conftest import make_settings
from tests.integration.conftest import Headers, bearer, make_key
from tests.support.db_proxy import Proxy, proxied_url, upstream_opener
from tests.support.jobs import create_job
from tests.support.site import LocalSite

EXPORT = "/api/v1/export/jobs"
TABLE = ["url", "final_url", "status_code", "ok", "depth", "fetched_at", "error"]

# Values that break naive writers: separators, quotes, line breaks of every kind, escapes
# of the formats involved, non-ASCII, controls, markup, Excel's own _xHHHH_ escapes.
TRICKY = [
    "plain",
    "comma, inside",
    'quote " inside',
    '"fully quoted"',
    'trailing quote"',
    "line\nbreak",
    "crlf\r\nbreak",
    "cr\ronly",
    '"\n"',
    'odd "quote\nacross" lines',
    "tab\tinside",
    "back\\slash \\n is not a newline \\\\",
    "ünïcödé \u2013 \u201ccurly\u201d 中文 😀",
    "",
    "  padded  ",
    "=1+1",
    "control\x01\x1fchars",
    "_x0041_ literal",
    "<b>&amp;</b>",
    "\\",
]


# --------------------------------------------------------------------------------------
# Test data, inserted straight into the database


async def insert_job(
    db: ConnectionManager,
    pages: list[dict[str, Any]],
    *,
    tenant: str = "tenant-a",
    fields: tuple[str, ...] = ("title", "price", "links"),
    status: str = "completed",
) -> uuid.UUID:
    """A job with one task and one stored page per entry of `pages` (url, ok, data, ...)."""
    job_id = uuid.uuid4()
    spec = {"urls": [], "extract": {name: {"css": ".x"} for name in fields}}
    ok = sum(1 for p in pages if p.get("ok", True))
    async with db.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO jobs (id, tenant, kind, status, spec, total, succeeded, failed) "
                "VALUES (:id, :tenant, 'scrape', :status, CAST(:spec AS jsonb), :n, :ok, :bad)"
            ),
            {
                "id": job_id,
                "tenant": tenant,
                "status": status,
                "spec": orjson.dumps(spec).decode(),
                "n": len(pages),
                "ok": ok,
                "bad": len(pages) - ok,
            },
        )
        for page in pages:
            task_id = (
                await conn.execute(
                    text(
                        "INSERT INTO tasks (job_id, url, url_hash, host, status, attempts) "
                        "VALUES (:job, :url, sha256(convert_to(:url, 'UTF8')), 'x.example', "
                        "'succeeded', 1) RETURNING id"
                    ),
                    {"job": job_id, "url": page["url"]},
                )
            ).scalar_one()
            await conn.execute(
                text(
                    "INSERT INTO pages (job_id, task_id, url, final_url, status_code, ok, depth, "
                    "elapsed_ms, data, error, fetched_at) VALUES (:job, :task, :url, :final, "
                    ":code, :ok, :depth, :ms, CAST(:data AS jsonb), :error, :at)"
                ),
                {
                    "job": job_id,
                    "task": task_id,
                    "url": page["url"],
                    "final": page.get("final_url", page["url"]),
                    "code": page.get("status_code", 200),
                    "ok": page.get("ok", True),
                    "depth": page.get("depth", 0),
                    "ms": page.get("elapsed_ms", 12),
                    "data": orjson.dumps(page.get("data", {})).decode(),
                    "error": page.get("error"),
                    "at": page.get("fetched_at", datetime.now(UTC)),
                },
            )
    return job_id


def tricky_pages() -> list[dict[str, Any]]:
    base = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    pages: list[dict[str, Any]] = []
    for i, value in enumerate(TRICKY):
        pages.append(
            {
                "url": f"https://x.example/p/{i}?q=a,b",
                "depth": i % 3,
                "fetched_at": base + timedelta(seconds=i, microseconds=i * 1000),
                "data": {"title": value, "price": f"{i}.99", "links": [value, "https://b/"]},
            }
        )
    pages.append(  # a failure: no final URL, no status, an error with line breaks
        {
            "url": "https://x.example/broken",
            "final_url": None,
            "status_code": None,
            "ok": False,
            "elapsed_ms": None,
            "error": 'timeout, "read"\nafter 30s',
            "fetched_at": base,
            "data": {},
        }
    )
    pages.append(  # a 404: fetched, not ok, whole microseconds
        {
            "url": "https://x.example/missing",
            "status_code": 404,
            "ok": False,
            "error": "HTTP 404",
            "fetched_at": base.replace(microsecond=0),
            "data": {"title": None, "price": None, "links": []},
        }
    )
    return pages


async def stored_pages(db: ConnectionManager, job_id: uuid.UUID) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            text("SELECT * FROM pages WHERE job_id = :id ORDER BY id"), {"id": job_id}
        )
        return [dict(r) for r in rows.mappings()]


def ts(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0), value
    assert value.endswith("Z"), value
    return parsed


def cell(value: Any) -> str:
    """What a CSV cell holds for an extract value: text as it is, lists as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_csv(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))


async def export(
    client: httpx.AsyncClient, job_id: uuid.UUID | str, headers: Headers, **params: Any
) -> httpx.Response:
    return await client.get(f"{EXPORT}/{job_id}", params=params, headers=headers)


# --------------------------------------------------------------------------------------
# Formats


async def test_csv_is_rfc4180_and_round_trips_every_value(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    job_id = await insert_job(db, tricky_pages())
    response = await export(client, job_id, auth_headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv; charset=utf-8")
    assert response.headers["content-disposition"] == (f'attachment; filename="job-{job_id}.csv"')
    body = response.content
    assert not body.startswith(export_service.UTF8_BOM)

    rows = parse_csv(body)
    assert rows[0] == [*TABLE, "links", "price", "title"]  # extract fields alphabetical
    pages = await stored_pages(db, job_id)
    assert len(rows) == 1 + len(pages)
    for row, page in zip(rows[1:], pages, strict=True):
        data = page["data"]
        expected = [
            page["url"],
            page["final_url"] or "",
            "" if page["status_code"] is None else str(page["status_code"]),
            "true" if page["ok"] else "false",
            str(page["depth"]),
            row[5],
            page["error"] or "",
        ]
        assert row[:7] == expected
        assert ts(row[5]) == page["fetched_at"]
        assert row[7] == cell(data.get("links"))
        if data.get("links"):
            assert json.loads(row[7]) == data["links"]
        assert row[8:] == [cell(data.get("price")), cell(data.get("title"))]

    # RFC 4180: every record ends with CRLF; line breaks inside values are kept as they
    # were (the LF of "line\nbreak" stays a lone LF, "crlf\r\nbreak" keeps its CR)
    assert body.endswith(b"\r\n")
    assert body.count(b"\r\n") == len(rows) + sum(
        cell.count("\r\n") for row in rows for cell in row
    )
    assert "line\nbreak" in [r[-1] for r in rows] and "cr\ronly" in [r[-1] for r in rows]

    with_bom = await export(client, job_id, auth_headers, bom="true")
    assert with_bom.status_code == 200
    assert with_bom.content == export_service.UTF8_BOM + body


async def test_jsonl_and_json_carry_the_page_objects_of_the_pages_api(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    job_id = await insert_job(db, tricky_pages())
    api = await client.get(
        f"/api/v1/jobs/{job_id}/pages", params={"limit": 200}, headers=auth_headers
    )
    assert api.status_code == 200
    expected = api.json()["items"]
    assert len(expected) == len(TRICKY) + 2

    def normal(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**item, "fetched_at": ts(item["fetched_at"])} for item in items]

    jsonl = await export(client, job_id, auth_headers, format="jsonl")
    assert jsonl.status_code == 200
    assert jsonl.headers["content-type"] == "application/x-ndjson"
    assert jsonl.headers["content-disposition"].endswith(f'filename="job-{job_id}.jsonl"')
    lines = jsonl.content.split(b"\n")
    assert lines[-1] == b""  # every object ends with a newline, none spans two
    objects = [json.loads(line) for line in lines[:-1]]
    assert list(objects[0]) == [*export_service.JSON_KEYS]
    assert normal(objects) == normal(expected)

    array = await export(client, job_id, auth_headers, format="json")
    assert array.status_code == 200
    assert array.headers["content-type"] == "application/json"
    assert normal(json.loads(array.content)) == normal(expected)


async def test_xlsx_opens_in_openpyxl_with_typed_cells(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    job_id = await insert_job(db, tricky_pages())
    response = await export(client, job_id, auth_headers, format="xlsx")
    assert response.status_code == 200
    assert response.headers["content-type"] == export_service.MEDIA_TYPES["xlsx"]
    assert response.headers["content-disposition"].endswith(f'filename="job-{job_id}.xlsx"')

    book = openpyxl.load_workbook(io.BytesIO(response.content))
    assert book.sheetnames == ["pages"]
    sheet = book["pages"]
    rows = list(sheet.iter_rows(values_only=True))
    assert list(rows[0]) == [*TABLE, "links", "price", "title"]
    assert sheet["A1"].font.b and sheet.freeze_panes == "A2"
    pages = await stored_pages(db, job_id)
    assert len(rows) == 1 + len(pages)

    def text_of(value: Any) -> Any:
        # openpyxl hands over the cell text as stored; Excel decodes its _xHHHH_ escapes
        return unescape(value) if isinstance(value, str) else value

    for row, page in zip(rows[1:], pages, strict=True):
        url, final_url, code, ok, depth, fetched_at, error, links, price, title = row
        assert (url, final_url, code, ok, depth) == (
            page["url"],
            page["final_url"],
            page["status_code"],
            page["ok"],
            page["depth"],
        )
        assert text_of(error) == page["error"]
        # an Excel date (UTC); openpyxl rounds to the millisecond
        assert isinstance(fetched_at, datetime)
        delta = fetched_at.replace(tzinfo=UTC) - page["fetched_at"]
        assert abs(delta) <= timedelta(milliseconds=1)
        data = page["data"]
        assert text_of(price) == data.get("price")
        assert text_of(title) == data.get("title")
        if "links" in data:
            assert json.loads(text_of(links)) == data["links"]
        else:
            assert links is None


async def test_empty_job_exports_a_valid_file_in_every_format(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    job_id = await insert_job(db, [], status="queued")
    csv_body = (await export(client, job_id, auth_headers)).content
    assert parse_csv(csv_body) == [[*TABLE, "links", "price", "title"]]
    assert (await export(client, job_id, auth_headers, format="jsonl")).content == b""
    assert json.loads((await export(client, job_id, auth_headers, format="json")).content) == []
    xlsx = await export(client, job_id, auth_headers, format="xlsx")
    rows = list(openpyxl.load_workbook(io.BytesIO(xlsx.content)).active.iter_rows(values_only=True))
    assert rows == [(*TABLE, "links", "price", "title")]


async def test_xlsx_starts_a_new_sheet_at_excels_row_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Excel stops at 1,048,576 rows a sheet; the rows go on in "pages 2" (header again)."""
    monkeypatch.setattr(export_service, "XLSX_MAX_ROWS", 3)  # header + 2 rows a sheet
    columns = export_service.resolve_columns(["title"], ["url", "title"], "xlsx")
    stream = export_service.XlsxStream(columns)
    data = stream.add_rows([(f"u{i}", f"t{i}") for i in range(3)])
    data += stream.add_rows([("u3", None), ("u4", "t4")]) + stream.finish()
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames == ["pages", "pages 2", "pages 3"]
    values = [list(sheet.iter_rows(values_only=True)) for sheet in book]
    header = ("url", "title")
    assert values == [
        [header, ("u0", "t0"), ("u1", "t1")],
        [header, ("u2", "t2"), ("u3", None)],
        [header, ("u4", "t4")],
    ]


async def test_reframing_does_not_depend_on_chunk_boundaries(db: ConnectionManager) -> None:
    """PostgreSQL's COPY output, cut anywhere (mid-row, mid-escape, mid-character),
    reframes to the same bytes and row count as in one piece."""
    job_id = await insert_job(db, tricky_pages())
    fields = ["links", "price", "title"]
    rng = random.Random(5)
    async with export_service._snapshot(db) as conn:
        for fmt in ("csv", "jsonl", "json"):
            request = export_service.ExportRequest(format=fmt)  # type: ignore[arg-type]
            columns = export_service.resolve_columns(fields, (), request.format)
            parts: list[bytes] = []

            async def sink(data: bytes, parts: list[bytes] = parts) -> None:
                parts.append(bytes(data))

            await conn.copy_from_query(
                export_service.select_sql(job_id, columns, request),
                output=sink,
                format="csv" if fmt == "csv" else "text",
                null=None if fmt == "csv" else "null",
            )
            raw = b"".join(parts)

            def frames(fmt: str = fmt, columns: list[Any] = columns) -> Any:
                if fmt == "csv":
                    return export_service._CsvFrames()
                keys = [key for key, _ in export_service.json_columns(columns)]
                lines = export_service._JsonLines(keys)
                return export_service._JsonArray(lines) if fmt == "json" else lines

            whole, rows = frames()(raw)
            assert rows == len(TRICKY) + 2
            for _ in range(30):
                cuts = sorted(rng.sample(range(1, len(raw)), 40))
                framer, out, counted = frames(), [], 0
                for lo, hi in zip([0, *cuts], [*cuts, len(raw)], strict=True):
                    data, n = framer(raw[lo:hi])
                    out.append(data)
                    counted += n
                assert (b"".join(out), counted) == (whole, rows)
            if fmt == "json":
                assert len(json.loads(b"[" + whole + b"]")) == rows
            elif fmt == "jsonl":
                assert len([json.loads(line) for line in whole.splitlines()]) == rows


async def test_job_without_extract_fields(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    job_id = await insert_job(db, tricky_pages()[:2], fields=())
    rows = parse_csv((await export(client, job_id, auth_headers)).content)
    assert rows[0] == TABLE and len(rows) == 3
    response = await export(client, job_id, auth_headers, fields="data")
    assert response.status_code == 422
    assert "no extract fields" in response.json()["detail"]


# --------------------------------------------------------------------------------------
# fields and status


async def test_fields_choose_and_order_the_columns(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    job_id = await insert_job(db, tricky_pages())
    pages = await stored_pages(db, job_id)

    response = await export(client, job_id, auth_headers, fields="price,url,status_code")
    rows = parse_csv(response.content)
    assert rows[0] == ["price", "url", "status_code"]
    assert rows[1:] == [
        [
            cell(p["data"].get("price")),
            p["url"],
            "" if p["status_code"] is None else str(p["status_code"]),
        ]
        for p in pages
    ]

    # repeated parameters, blanks and repeats, elapsed_ms (not a default CSV column)
    response = await client.get(
        f"{EXPORT}/{job_id}",
        params=[("fields", "url, elapsed_ms"), ("fields", ",url,title")],
        headers=auth_headers,
    )
    rows = parse_csv(response.content)
    assert rows[0] == ["url", "elapsed_ms", "title"]
    assert rows[-2] == ["https://x.example/broken", "", ""]

    # `data` = every extract field; JSON keeps chosen extract fields under "data"
    rows = parse_csv((await export(client, job_id, auth_headers, fields="data")).content)
    assert rows[0] == ["links", "price", "title"]
    lines = (await export(client, job_id, auth_headers, format="jsonl", fields="title,url")).content
    objects = [json.loads(line) for line in lines.splitlines()]
    assert objects == [{"data": {"title": p["data"].get("title")}, "url": p["url"]} for p in pages]

    xlsx = await export(client, job_id, auth_headers, format="xlsx", fields="ok,depth")
    sheet = openpyxl.load_workbook(io.BytesIO(xlsx.content)).active
    assert list(sheet.iter_rows(values_only=True)) == [("ok", "depth")] + [
        (p["ok"], p["depth"]) for p in pages
    ]


async def test_extract_fields_named_like_page_columns(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    pages = [{"url": "https://x.example/a", "data": {"url": "extracted", "error": "none"}}]
    job_id = await insert_job(db, pages, fields=("url", "error"))
    rows = parse_csv((await export(client, job_id, auth_headers)).content)
    assert rows[0] == [*TABLE, "data.error", "data.url"]
    assert rows[1][0] == "https://x.example/a" and rows[1][-2:] == ["none", "extracted"]
    rows = parse_csv((await export(client, job_id, auth_headers, fields="data.url,url")).content)
    assert rows == [["data.url", "url"], ["extracted", "https://x.example/a"]]


async def test_status_filter(
    client: httpx.AsyncClient, db: ConnectionManager, auth_headers: Headers
) -> None:
    job_id = await insert_job(db, tricky_pages())
    pages = await stored_pages(db, job_id)
    for status, keep in (("ok", True), ("error", False)):
        response = await export(client, job_id, auth_headers, status=status)
        assert response.headers["content-disposition"].endswith(
            f'filename="job-{job_id}-{status}.csv"'
        )
        rows = parse_csv(response.content)[1:]
        assert [r[0] for r in rows] == [p["url"] for p in pages if p["ok"] is keep]
        assert {r[3] for r in rows} == {"true" if keep else "false"}
        lines = (await export(client, job_id, auth_headers, status=status, format="jsonl")).content
        assert [json.loads(x)["ok"] for x in lines.splitlines()] == [keep] * len(rows)
    everything = parse_csv((await export(client, job_id, auth_headers, status="all")).content)
    assert len(everything) == 1 + len(pages)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"fields": "url,nope"}, "unknown field 'nope'"),
        ({"fields": "data.nope"}, "unknown field 'data.nope'"),
        ({"format": "xls"}, "format"),
        ({"status": "failed"}, "status"),
        ({"bom": "maybe"}, "bom"),
        ({"fields": ",".join(f"f{i}" for i in range(201))}, "at most 200 fields"),
    ],
)
async def test_bad_parameters_are_422_problems(
    client: httpx.AsyncClient,
    db: ConnectionManager,
    auth_headers: Headers,
    params: dict[str, str],
    needle: str,
) -> None:
    job_id = await insert_job(db, tricky_pages()[:2])
    before = db.pool_status()
    response = await export(client, job_id, auth_headers, **params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert needle in response.text
    assert db.pool_status()["checked_out"] == before["checked_out"]


async def test_export_is_tenant_scoped(
    client: httpx.AsyncClient,
    db: ConnectionManager,
    auth_headers: Headers,
    other_headers: Headers,
) -> None:
    job_id = await insert_job(db, tricky_pages()[:2])
    assert (await export(client, job_id, auth_headers)).status_code == 200
    for headers in (other_headers, auth_headers):
        target = job_id if headers is other_headers else uuid.uuid4()
        for fmt in export_service.FORMATS:
            response = await export(client, target, headers, format=fmt)
            assert response.status_code == 404, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert str(target) in response.json()["detail"]
    assert (await client.get(f"{EXPORT}/{job_id}")).status_code == 401
    assert (await export(client, "not-a-uuid", auth_headers)).status_code == 422
    # a second key of the same tenant shares the job
    same_tenant = bearer(await make_key(db, "second", tenant="tenant-a"))
    assert (await export(client, job_id, same_tenant)).status_code == 200


# --------------------------------------------------------------------------------------
# Consistency: running jobs and snapshots


async def test_export_while_the_job_runs(
    client: httpx.AsyncClient, db: ConnectionManager, db_url: str, auth_headers: Headers
) -> None:
    """A running job exports what is stored so far (count and rows from one snapshot);
    once it ends, everything."""
    settings = make_settings(db_url, worker_concurrency=4, retry_base_s=0.05)
    async with LocalSite().serve() as site:
        site.delay = 0.25
        urls = [site.url(f"/page/{i}") for i in range(24)]
        extract = {"title": {"css": "h1", "value": "text"}, "price": {"css": ".price"}}
        job_id = await create_job(db, urls, extract=extract, tenant="tenant-a")
        worker_db = ConnectionManager(settings, application_name="trawler-worker")
        executor = AsyncJobExecutor(worker_db, settings)
        await executor.start()
        partial: list[int] = []
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = await job_status(db, job_id)
                snapshot = await export_service.open_export(
                    db, "tenant-a", job_id, export_service.ExportRequest(), count=True
                )
                try:
                    body = b"".join([chunk async for chunk in snapshot.chunks()])
                finally:
                    await snapshot.aclose()
                rows = parse_csv(body)[1:]
                assert snapshot.rows == snapshot.total == len(rows)
                assert {r[0] for r in rows} <= set(urls)
                assert all(r[3] == "true" and r[-1].startswith("Product ") for r in rows)
                if status == "running" and 0 < len(rows) < len(urls):
                    partial.append(len(rows))
                    # and over HTTP, in another format, while it still runs
                    response = await export(client, job_id, auth_headers, format="jsonl")
                    assert response.status_code == 200
                    assert len(response.content.splitlines()) >= len(rows)
                if status in ("completed", "failed"):
                    break
                await asyncio.sleep(0.1)
        finally:
            await executor.stop(grace=1.0)
            await worker_db.dispose()
    assert partial, "no export happened while the job was running"
    assert partial == sorted(partial)  # snapshots only grow
    final = parse_csv((await export(client, job_id, auth_headers)).content)[1:]
    assert sorted(r[0] for r in final) == sorted(urls)
    pages = {p["url"]: p for p in await stored_pages(db, job_id)}
    for row in final:
        page = pages[row[0]]
        assert row[-2:] == [page["data"]["price"], page["data"]["title"]]


async def job_status(db: ConnectionManager, job_id: uuid.UUID) -> str:
    async with db.engine.connect() as conn:
        value = (
            await conn.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id})
        ).scalar_one()
        return str(value)


async def test_snapshot_does_not_see_pages_committed_after_it_began(
    db: ConnectionManager,
) -> None:
    """The export's transaction reads one snapshot from its first statement on: the row
    count, the columns and the rows agree even while workers keep committing pages."""
    job_id = await insert_job(db, tricky_pages()[:3])
    async with export_service._snapshot(db) as conn:
        before = await conn.fetchval("SELECT count(*) FROM pages WHERE job_id = $1", job_id)
        await insert_pages_elsewhere(db, job_id, 5)
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(bytes(data))

        await conn.copy_from_query(
            f"SELECT url FROM pages WHERE job_id = '{job_id}'", output=sink, format="csv"
        )
        assert before == 3 and b"".join(chunks).count(b"\n") == 3
    async with db.engine.connect() as conn:
        after = (
            await conn.execute(
                text("SELECT count(*) FROM pages WHERE job_id = :id"), {"id": job_id}
            )
        ).scalar_one()
    assert after == 8
    assert db.pool_status()["checked_out"] == 0


async def insert_pages_elsewhere(db: ConnectionManager, job_id: uuid.UUID, n: int) -> None:
    """n more pages for the job, committed on a connection of their own."""
    async with db.connect() as conn:
        await conn.execute(
            text(
                """
                WITH t AS (
                    INSERT INTO tasks (job_id, url, url_hash, host, status, attempts)
                    SELECT :job, 'https://more.example/' || g,
                           sha256(convert_to(:job_text || g, 'UTF8')), 'more.example',
                           'succeeded', 1
                    FROM generate_series(1, :n) g
                    RETURNING id, url
                )
                INSERT INTO pages (job_id, task_id, url, final_url, status_code, ok, depth,
                                   elapsed_ms, data)
                SELECT :job, t.id, t.url, t.url, 200, true, 1, 5,
                       jsonb_build_object(
                           'title', 'Title ' || t.id || repeat(' lorem, "ipsum" dolor', 8),
                           'price', t.id::text)
                FROM t
                """
            ),
            {"job": job_id, "job_text": str(job_id), "n": n},
        )


# --------------------------------------------------------------------------------------
# Disconnects: a real server, real sockets, a small pool


@pytest.fixture
def small_pool_settings(db_url: str) -> Settings:
    return make_settings(db_url, pool_size=2, max_overflow=0, pool_timeout=2.0)


@pytest.fixture
async def small_pool_app(small_pool_settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(small_pool_settings, migrate=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def served(small_pool_app: FastAPI) -> AsyncIterator[int]:
    """The app under uvicorn on a real port (ASGITransport would buffer the response)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(small_pool_app, lifespan="off", ws="none", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started, timeout=5)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)
        sock.close()


async def wait_until(condition: Callable[[], bool], *, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def start_download(
    port: int, path: str, headers: Headers
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 GET that reads the head and the first KiB of the body, then stops
    reading (a tiny receive buffer: the server soon has to wait for us)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    await asyncio.wait_for(reader.readexactly(1024), 10)
    return reader, writer


async def test_aborted_downloads_release_their_connection_at_once(
    served: int,
    small_pool_app: FastAPI,
    db: ConnectionManager,
    auth_headers: Headers,
) -> None:
    """Clients that hang up mid-download (FIN or RST), again and again, with a pool of 2:
    each export's connection comes back within a moment, and a full export still works."""
    job_id = await insert_job(db, tricky_pages()[:1])
    await insert_pages_elsewhere(db, job_id, 30_000)  # ~10 MB of CSV: more than buffers hold
    manager: ConnectionManager = small_pool_app.state.db
    releases: list[float] = []
    for attempt in range(12):
        fmt = ("csv", "json", "xlsx", "jsonl")[attempt % 4]
        _reader, writer = await start_download(
            served, f"{EXPORT}/{job_id}?format={fmt}", auth_headers
        )
        # mid-stream: the export holds one of the two connections
        assert manager.pool_status()["checked_out"] == 1
        if attempt % 2:
            # RST instead of FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        releases.append(
            await wait_until(lambda: manager.pool_status()["checked_out"] == 0, timeout=2.0)
        )
    assert max(releases) < 2.0

    # the server ended every aborted COPY: no export backend is left working
    async def busy_backends() -> int:
        async with db.engine.connect() as conn:
            value = await conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'trawler-api' AND state <> 'idle'"
                )
            )
            return int(value.scalar_one())

    deadline = time.monotonic() + 3
    while await busy_backends() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await busy_backends() == 0

    # and the pool (2 connections, no overflow) serves complete exports afterwards
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served}", timeout=30) as http:
        for fmt in ("csv", "xlsx"):
            params = {"format": fmt} if fmt == "csv" else {"format": fmt, "fields": "url"}
            response = await http.get(f"{EXPORT}/{job_id}", params=params, headers=auth_headers)
            assert response.status_code == 200
            if fmt == "csv":
                assert len(parse_csv(response.content)) == 1 + 30_001
            else:
                sheet = openpyxl.load_workbook(io.BytesIO(response.content), read_only=True)
                assert sum(1 for _ in sheet.active.iter_rows()) == 1 + 30_001
    assert manager.pool_status()["checked_out"] == 0


# --------------------------------------------------------------------------------------
# Database outage


@pytest.fixture
async def proxy(pg_server: str) -> AsyncIterator[Proxy]:
    p = Proxy(upstream_opener(pg_server))
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def proxied(db_url: str, proxy: Proxy) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = make_settings(
        proxied_url(db_url, proxy.port),
        pool_size=2,
        max_overflow=0,
        pool_timeout=1.0,
        db_connect_timeout=1.0,
        db_command_timeout=3.0,
    )
    application = create_app(settings, migrate=False)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://trawler.test") as c:
            yield application, c


async def test_database_outage_is_a_fast_503_and_a_broken_stream_fails_loudly(
    proxied: tuple[FastAPI, httpx.AsyncClient],
    proxy: Proxy,
    db: ConnectionManager,
    auth_headers: Headers,
) -> None:
    application, client = proxied
    job_id = await insert_job(db, tricky_pages()[:1])
    await insert_pages_elsewhere(db, job_id, 20_000)
    assert (await export(client, job_id, auth_headers, fields="url")).status_code == 200

    # mid-stream: the connection is cut under a running COPY; the export raises (it does
    # not end as if the file were complete) and gives its connection back
    manager: ConnectionManager = application.state.db
    running = await export_service.open_export(
        manager, "tenant-a", job_id, export_service.ExportRequest(format="jsonl")
    )
    try:
        stream = running.chunks()
        await anext(stream)
        await proxy.cut("refuse")
        started = time.monotonic()
        with pytest.raises(export_service.ExportFailed, match="failed after"):
            async for _ in stream:
                pass
        assert time.monotonic() - started < 5
    finally:
        await running.aclose()
    assert manager.pool_status()["checked_out"] == 0
    assert running.rows < 20_001

    # a new export while the database is unreachable: 503 + Retry-After, quickly
    started = time.monotonic()
    response = await export(client, job_id, auth_headers)
    assert time.monotonic() - started < 3
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["Retry-After"]) >= 1

    await proxy.restore()
    response = await export(client, job_id, auth_headers, format="json", fields="url")
    assert response.status_code == 200
    assert len(json.loads(response.content)) == 20_001


async def test_openapi_documents_the_export_route(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    operation = response.json()["paths"]["/api/v1/export/jobs/{job_id}"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"job_id", "format", "fields", "status"}
    assert set(operation["responses"]["200"]["content"]) == set(export_service.MEDIA_TYPES.values())
