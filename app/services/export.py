"""Job export: one snapshot of a job's pages streamed as CSV, JSONL, JSON or XLSX.

Shape of an export: a producer task owns one pooled connection in a REPEATABLE READ,
READ ONLY transaction. It looks the job up (tenant-scoped: another tenant's job is a 404),
resolves the columns (unknown `fields` are a 422), then streams the pages in `id` order
into a bounded queue, and the consumer (the HTTP response, the CLI) takes chunks from
there. Memory is bounded by the queue, never by the number of rows; a slow reader holds
back the producer, and through TCP, PostgreSQL.

- CSV, JSONL and JSON come from `COPY (SELECT ...) TO STDOUT`: PostgreSQL formats the rows
  (quoting, JSON escaping) and Python only reframes byte chunks. A COPY is one statement,
  so it reads one snapshot even while the job's workers keep storing pages.
- XLSX comes from a cursor in batches rendered to SpreadsheetML and deflated into a zip
  stream in a worker thread (zlib releases the GIL): nothing is written to disk and the
  first bytes leave before the last row is read.

The snapshot is taken by the job lookup, so the optional row count (the CLI's progress
bar), the columns and the rows all agree. A consumer that stops early (client gone,
Ctrl-C) calls `Export.aclose()`: the producer is cancelled and its connection terminated
at once (closing the socket ends the COPY on the server; waiting for a cancel round trip
would hold the pool slot for nothing).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import chain, compress, count, cycle, islice
from typing import IO, Any, Final, Literal, TypeVar, cast, get_args

import asyncpg
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util.concurrency import greenlet_spawn

from app.database.connection import ConnectionManager
from app.errors import NotFound, TrawlerError, Unprocessable

logger = logging.getLogger(__name__)

T = TypeVar("T")

ExportFormat = Literal["csv", "jsonl", "json", "xlsx"]
StatusFilter = Literal["ok", "error", "all"]
FORMATS: Final[tuple[str, ...]] = get_args(ExportFormat)
STATUSES: Final[tuple[str, ...]] = get_args(StatusFilter)

# The page columns, in the order of the page resource (GET /jobs/{id}/pages).
BUILTINS: Final = (
    "url",
    "final_url",
    "status_code",
    "ok",
    "depth",
    "fetched_at",
    "elapsed_ms",
    "error",
)
# CSV/XLSX columns when no `fields` are given (docs/DESIGN: export columns); then one per
# extract field. JSON and JSONL carry the whole page object, `data` included.
TABLE_COLUMNS: Final = ("url", "final_url", "status_code", "ok", "depth", "fetched_at", "error")
JSON_KEYS: Final = (*BUILTINS[:-1], "data", "error")
DATA_PREFIX: Final = "data."
MAX_FIELDS: Final = 200
MAX_FIELD_CHARS: Final = 100

MEDIA_TYPES: Final[dict[str, str]] = {
    "csv": "text/csv; charset=utf-8; header=present",
    "jsonl": "application/x-ndjson",
    "json": "application/json",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
UTF8_BOM: Final = b"\xef\xbb\xbf"

# Chunks in flight between the producer and the consumer (COPY output gathered to at least
# BATCH_BYTES; one deflated XLSX batch, ~80 KiB), and the size the consumer gathers before
# one write/send.
QUEUE_CHUNKS: Final = 16
BATCH_BYTES: Final = 64 * 1024
SEND_BYTES: Final = 256 * 1024
XLSX_BATCH_ROWS: Final = 1000
# The whole COPY runs under one asyncpg timeout (its default is the per-statement
# command_timeout, far too short for a large export read by a slow client). A snapshot
# held longer than this is ended rather than holding back vacuum forever.
EXPORT_TIMEOUT_S: Final = 6 * 3600.0

_BEGIN: Final = (
    "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; "
    # the statements below are built with quoted literals and format timestamps as text:
    # neither may depend on the server's or the role's settings
    "SET LOCAL standard_conforming_strings = on; "
    "SET LOCAL DateStyle = 'ISO, YMD'"
)
_JOB_SQL: Final = (
    "SELECT CASE WHEN jsonb_typeof(spec -> 'extract') = 'object' "
    "THEN ARRAY(SELECT jsonb_object_keys(spec -> 'extract')) ELSE '{}'::text[] END "
    "FROM jobs WHERE id = $1 AND tenant = $2"
)


class ExportFailed(Exception):
    """The export broke off after it started streaming (database error or outage)."""


# --------------------------------------------------------------------------------------
# Request and columns


@dataclass(frozen=True, slots=True)
class ExportRequest:
    format: ExportFormat = "csv"
    fields: tuple[str, ...] = ()
    status: StatusFilter = "all"
    bom: bool = False


def parse_fields(values: Sequence[str] | None) -> tuple[str, ...]:
    """`fields=a,b` and `fields=a&fields=b` both work; blanks and repeats are dropped."""
    names: dict[str, None] = {}
    for value in values or ():
        for part in value.split(","):
            name = part.strip()
            if not name or name in names:
                continue
            if len(name) > MAX_FIELD_CHARS:
                raise Unprocessable(f"field name {name[:40]!r}... is too long")
            if len(names) == MAX_FIELDS:
                raise Unprocessable(f"at most {MAX_FIELDS} fields")
            names[name] = None
    return tuple(names)


def make_request(
    format_: str = "csv",
    *,
    fields: Sequence[str] | None = None,
    status: str = "all",
    bom: bool = False,
) -> ExportRequest:
    """An ExportRequest from loose strings (the CLI); Unprocessable for bad values."""
    if format_ not in FORMATS:
        raise Unprocessable(f"unknown format {format_!r}; one of: {', '.join(FORMATS)}")
    if status not in STATUSES:
        raise Unprocessable(f"unknown status {status!r}; one of: {', '.join(STATUSES)}")
    return ExportRequest(
        format=format_,  # type: ignore[arg-type]  # checked just above
        fields=parse_fields(fields),
        status=status,  # type: ignore[arg-type]
        bom=bom,
    )


@dataclass(frozen=True, slots=True)
class Column:
    """One output column: a page column (`builtin`) or an extract field (`field`)."""

    name: str
    builtin: str | None = None
    field: str | None = None


def resolve_columns(
    extract_fields: Sequence[str], requested: Sequence[str], fmt: ExportFormat
) -> list[Column]:
    """The export's columns. Names resolve to a page column first, then to an extract
    field; `data.<name>` always names an extract field and `data` all of them. An extract
    field whose name is also a page column is headed `data.<name>` in CSV and XLSX."""
    extract = sorted(extract_fields)  # jsonb keeps no key order: alphabetical is stable

    def of_field(name: str) -> Column:
        header = DATA_PREFIX + name if name in BUILTINS else name
        return Column(name=header, field=name)

    if not requested:
        if fmt in ("json", "jsonl"):
            return [Column(name=key, builtin=key) for key in JSON_KEYS]
        return [Column(name=c, builtin=c) for c in TABLE_COLUMNS] + [of_field(f) for f in extract]

    known = set(extract)
    columns: list[Column] = []
    for name in requested:
        if name in BUILTINS:
            columns.append(Column(name=name, builtin=name))
        elif name == "data":
            columns.extend(of_field(f) for f in extract)
        elif name.startswith(DATA_PREFIX) and name[len(DATA_PREFIX) :] in known:
            columns.append(of_field(name[len(DATA_PREFIX) :]))
        elif name in known:
            columns.append(of_field(name))
        else:
            fields_text = ", ".join(extract) if extract else "none"
            raise Unprocessable(
                f"unknown field {name!r}: page columns are {', '.join(BUILTINS)}; "
                f"this job's extract fields: {fields_text}"
            )
    unique: dict[tuple[str | None, str | None], Column] = {}
    for column in columns:
        unique.setdefault((column.builtin, column.field), column)
    if not unique:  # `fields=data` on a job without extract fields
        raise Unprocessable("no columns to export: this job has no extract fields")
    return list(unique.values())


# --------------------------------------------------------------------------------------
# SQL: one SELECT per format over the job's pages in id order (ix_pages_job_id_id)


def _literal(value: str) -> str:
    # standard_conforming_strings is on in the export transaction (_BEGIN): doubling the
    # quotes is the whole quoting rule there; PostgreSQL text never holds NUL
    return "'" + value.replace("'", "''") + "'"


# timestamps as RFC 3339 in UTC, like the API: "2026-01-02T03:04:05.123456Z"
_ISO_TS: Final = "replace((p.fetched_at AT TIME ZONE 'UTC')::text, ' ', 'T') || 'Z'"
_CSV_BUILTINS: Final[dict[str, str]] = {
    "url": "p.url",
    "final_url": "p.final_url",
    "status_code": "p.status_code",
    "ok": "p.ok::text",
    "depth": "p.depth",
    "fetched_at": _ISO_TS,
    "elapsed_ms": "p.elapsed_ms",
    "error": "p.error",
}
# each column a JSON value as text; COPY prints SQL NULL as `null` (see _JsonLines)
_JSON_BUILTINS: Final[dict[str, str]] = {
    "url": "to_json(p.url)",
    "final_url": "to_json(p.final_url)",
    "status_code": "p.status_code",
    "ok": "p.ok::text",
    "depth": "p.depth",
    "fetched_at": f"'\"' || {_ISO_TS} || '\"'",
    "elapsed_ms": "p.elapsed_ms",
    "data": "p.data",
    "error": "to_json(p.error)",
}
# Excel's cell text limit is 32,767 characters: cut in the query, so an oversized value
# is never even fetched whole
XLSX_CELL_CHARS: Final = 32767
_XLSX_BUILTINS: Final[dict[str, str]] = {
    "url": f"left(p.url, {XLSX_CELL_CHARS})",
    "final_url": f"left(p.final_url, {XLSX_CELL_CHARS})",
    "status_code": "p.status_code",
    "ok": "p.ok",
    "depth": "p.depth",
    # an Excel serial date (days since 1899-12-30), in UTC
    "fetched_at": "date_part('epoch', p.fetched_at) / 86400.0 + 25569.0",
    "elapsed_ms": "p.elapsed_ms",
    "error": f"left(p.error, {XLSX_CELL_CHARS})",
}


def _where(job_id: uuid.UUID, status: StatusFilter) -> str:
    condition = {"ok": " AND p.ok", "error": " AND NOT p.ok", "all": ""}[status]
    return f"FROM pages p WHERE p.job_id = {_literal(str(job_id))}::uuid{condition}"


def select_sql(job_id: uuid.UUID, columns: Sequence[Column], request: ExportRequest) -> str:
    """The SELECT behind an export (the input of COPY, or of the XLSX cursor)."""
    where = _where(job_id, request.status)
    if request.format == "csv":
        exprs = [
            _CSV_BUILTINS[c.builtin] if c.builtin else f"p.data ->> {_literal(c.field or '')}"
            for c in columns
        ]
    elif request.format == "xlsx":
        exprs = [
            _XLSX_BUILTINS[c.builtin]
            if c.builtin
            else f"left(p.data ->> {_literal(c.field or '')}, {XLSX_CELL_CHARS})"
            for c in columns
        ]
    else:
        exprs = [expr for _, expr in json_columns(columns)]
    return f"SELECT {', '.join(exprs)} {where} ORDER BY p.id"


def json_columns(columns: Sequence[Column]) -> list[tuple[str, str]]:
    """(key, SQL expression of its JSON value) of a JSON/JSONL page object, in column
    order; the chosen extract fields go into one `data` object where the first of them
    was asked for."""
    picked = [c.field for c in columns if c.field is not None]
    out: list[tuple[str, str]] = []
    for column in columns:
        if column.builtin is not None:
            out.append((column.builtin, _JSON_BUILTINS[column.builtin]))
        elif column.field == picked[0]:
            pairs = ", ".join(f"{_literal(f)}, p.data -> {_literal(f)}" for f in picked)
            out.append(("data", f"json_build_object({pairs})"))
    return out


# --------------------------------------------------------------------------------------
# Reframing COPY output


class _CsvFrames:
    """COPY's CSV ends records with LF; RFC 4180 wants CRLF. A LF inside a quoted field is
    data and stays as it is. Quotes inside fields are doubled, so a line break is inside a
    field exactly when an odd number of quotes precede it in its record: only lines with
    an odd number of quotes switch between "in a field" and "between records". Finding
    them is C-level work on the chunk (keep quotes and line breaks, drop adjacent pairs of
    quotes: one quote left on a line marks it); the Python loop runs per such line (rare:
    extracted text and attributes have their whitespace collapsed), not per row."""

    _NOT_QUOTE_OR_LF = bytes(c for c in range(256) if c not in b'"\n')

    def __init__(self) -> None:
        self.quoted = False  # the previous chunk ended inside a quoted field

    def __call__(self, chunk: bytes) -> tuple[bytes, int]:
        data = bytes(chunk)
        marks = data.translate(None, self._NOT_QUOTE_OR_LF).replace(b'""', b"")
        if not self.quoted and b'"' not in marks:
            return data.replace(b"\n", b"\r\n"), data.count(b"\n")
        # the lines with an odd number of quotes
        switches = list(compress(count(), marks.split(b"\n")))
        lines = data.split(b"\n")
        breaks = len(lines) - 1
        out: list[bytes] = []
        quoted, start, inner = self.quoted, 0, 0
        for i in switches:
            # the breaks after lines start..i-1 are all on the same side of the quotes
            out.append((b"\n" if quoted else b"\r\n").join(lines[start : i + 1]))
            inner += (i - start) if quoted else 0
            quoted = not quoted
            if i < breaks:  # the break after line i, on its new side
                out.append(b"\n" if quoted else b"\r\n")
                inner += 1 if quoted else 0
            start = i + 1
        if start <= breaks:
            out.append((b"\n" if quoted else b"\r\n").join(lines[start:]))
            inner += (breaks - start) if quoted else 0
        self.quoted = quoted
        return b"".join(out), breaks - inner


class _JsonLines:
    """JSONL from COPY's text format: one row = the JSON value of each key, tab-separated,
    SQL NULL printed as `null` (COPY's NULL option). Keys are put between the values here,
    in bulk, rather than concatenated row by row in SQL (~15% of PostgreSQL's time).

    COPY's text format backslash-escapes control characters, tabs, newlines and the
    backslash. JSON text holds no raw control characters (JSON escapes them), so a raw
    tab only ever separates values, a raw newline only ends a row, and the doubled
    backslash is the one escape to undo. A chunk may end inside a row: the rest waits.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self._open = f'{{"{keys[0]}":'.encode()
        self._separators = [f',"{key}":'.encode() for key in keys[1:]]
        self._rest = b""

    def close(self) -> None:
        """At the end of the COPY: nothing may be left over (a row cut short)."""
        if self._rest:
            raise ValueError("COPY output ended inside a row")

    def __call__(self, chunk: bytes) -> tuple[bytes, int]:
        data = self._rest + bytes(chunk) if self._rest else bytes(chunk)
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        if not end:
            return b"", 0
        body = data[:end].replace(b"\\\\", b"\\")
        rows = body.count(b"\n")
        values = body.split(b"\t")
        if len(values) != rows * len(self._separators) + 1:
            raise ValueError("COPY rows do not have one value per key")
        keys = chain(islice(cycle(self._separators), len(values) - 1), (b"",))
        joined = b"".join(chain.from_iterable(zip(values, keys, strict=True)))
        opened = self._open + joined.replace(b"\n", b"}\n" + self._open)
        return opened[: -len(self._open)], rows


class _JsonArray:
    """JSONL turned into one JSON array: `[`, the objects separated by `,`, `]`."""

    def __init__(self, lines: _JsonLines) -> None:
        self._lines = lines
        self._pending = False  # an object was written; its separator is not out yet

    def __call__(self, chunk: bytes) -> tuple[bytes, int]:
        data, rows = self._lines(chunk)
        if not data:
            return b"", 0
        # whole objects, each ending in a newline
        head = b",\n" if self._pending else b""
        self._pending = True
        return head + data[:-1].replace(b"\n", b",\n"), rows


# --------------------------------------------------------------------------------------
# XLSX: a streaming SpreadsheetML writer (inline strings, no temporary files)


_NS_MAIN: Final = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_NS_REL: Final = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_NS_PKG_REL: Final = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML_HEAD: Final = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_CT_SHEET: Final = "application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"
# Excel's sheet limit, header row included; beyond it the rows go on in a new sheet
XLSX_MAX_ROWS: Final = 1_048_576
# zipfile without ZIP64 caps an entry at 2 GiB - 1; a sheet past this many bytes of XML
# starts a new one (the margin holds what is pending: at most 1 Mi characters, and a row)
_SHEET_MAX_BYTES: Final = 1_900_000_000

_STYLES: Final = (
    _XML_HEAD + f'<styleSheet xmlns="{_NS_MAIN}">'
    '<numFmts count="1"><numFmt numFmtId="164" formatCode="yyyy-mm-dd hh:mm:ss"/></numFmts>'
    '<fonts count="2"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font>'
    '<font><b/><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/>'
    "</cellStyleXfs>"
    '<cellXfs count="3"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
    '<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
    "</styleSheet>"
)
_ROOT_RELS: Final = (
    _XML_HEAD + f'<Relationships xmlns="{_NS_PKG_REL}">'
    f'<Relationship Id="rId1" Type="{_NS_REL}/officeDocument" Target="xl/workbook.xml"/>'
    "</Relationships>"
)

# Characters a cell's text cannot hold as they are: XML's three, the C0 controls XML 1.0
# forbids (and CR, which XML parsers fold into LF), U+FFFE/U+FFFF, and a literal "_xHHHH_"
# (Excel would read it as an escape). The controls become Excel's _xHHHH_ escape.
_XML_SPECIAL: Final = re.compile("[&<>\x00-\x08\x0b-\x1f\ufffe\uffff]|_(?=x[0-9A-Fa-f]{4}_)")
_ENTITIES: Final = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _ENTITIES.get(char) or f"_x{ord(char):04X}_"


def xlsx_text(value: str) -> str:
    """A cell's text, escaped for SpreadsheetML and cut to Excel's limit (in UTF-16 units)."""
    if len(value) > XLSX_CELL_CHARS // 2:
        units = value.encode("utf-16-le")
        if len(units) > 2 * XLSX_CELL_CHARS:
            value = units[: 2 * XLSX_CELL_CHARS].decode("utf-16-le", "ignore")
    if _XML_SPECIAL.search(value) is None:
        return value
    return _XML_SPECIAL.sub(_escape_char, value)


def _column_letters(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


_TEXT, _NUMBER, _BOOL, _DATE = range(4)
_KINDS: Final = {
    "status_code": _NUMBER,
    "ok": _BOOL,
    "depth": _NUMBER,
    "fetched_at": _DATE,
    "elapsed_ms": _NUMBER,
}
_WIDTHS: Final = {"url": 50, "final_url": 50, "fetched_at": 20, "error": 40}


class _Collect:
    """The zip's output: bytes gathered until taken (zipfile writes, we send)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        return None

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class XlsxStream:
    """Rows in, xlsx bytes out, in order and as they are produced.

    Sheets are `<sheetData>` of inline-string cells, deflated (level 1: the sheet XML is
    ~10x redundant, and this is the hot loop) into zip entries written with data
    descriptors, so nothing needs seeking or a temporary file. Every sheet starts with
    the header row (bold, frozen); the workbook, its relationships, styles and content
    types follow the sheets, when their number is known. Not thread-safe: use it from one
    thread at a time (the export calls it through asyncio.to_thread, one call at a time).
    """

    def __init__(self, columns: Sequence[Column], *, compresslevel: int = 1) -> None:
        self._headers = [c.name for c in columns]
        self._kinds = [_KINDS.get(c.builtin or "", _TEXT) for c in columns]
        self._widths = [_WIDTHS.get(c.builtin or "", 16) for c in columns]
        self._letters = [_column_letters(i) for i in range(len(columns))]
        self._out = _Collect()
        self._compresslevel = compresslevel
        self._zip = zipfile.ZipFile(
            cast(IO[bytes], self._out),
            "w",
            compression=zipfile.ZIP_DEFLATED,
            compresslevel=compresslevel,
        )
        self._sheet: Any = None  # the open zip entry (zipfile's private writer class)
        self._sheets = 0
        self._row = 0  # the last row number written in the current sheet
        self._bytes = 0  # of the current sheet's XML, written to its zip entry so far
        self._pending: list[str] = []
        self._pending_chars = 0
        self._closed = False

    def _open_sheet(self) -> None:
        self._sheets += 1
        entry = zipfile.ZipInfo(
            f"xl/worksheets/sheet{self._sheets}.xml", date_time=time.localtime()[:6]
        )
        entry.compress_type = zipfile.ZIP_DEFLATED
        # what ZipFile.open() sets from the archive's level when given a bare name (which
        # would date the entry 1980); the slot is private, but in 3.11 to 3.13 alike
        entry._compresslevel = self._compresslevel  # type: ignore[attr-defined]
        self._sheet = self._zip.open(entry, "w")
        cols = "".join(
            f'<col min="{i}" max="{i}" width="{w}" customWidth="1"/>'
            for i, w in enumerate(self._widths, start=1)
        )
        header = "".join(
            f'<c r="{letter}1" t="inlineStr" s="2"><is><t>{xlsx_text(name)}</t></is></c>'
            for letter, name in zip(self._letters, self._headers, strict=True)
        )
        self._write(
            _XML_HEAD + f'<worksheet xmlns="{_NS_MAIN}" xmlns:r="{_NS_REL}">'
            '<sheetViews><sheetView workbookViewId="0"><pane ySplit="1" topLeftCell="A2" '
            'activePane="bottomLeft" state="frozen"/><selection pane="bottomLeft"/>'
            "</sheetView></sheetViews>"
            f'<sheetFormatPr defaultRowHeight="15"/><cols>{cols}</cols><sheetData>'
            f'<row r="1">{header}</row>'
        )
        self._row = 1
        self._bytes = 0

    def _close_sheet(self) -> None:
        self._write("</sheetData></worksheet>")
        self._flush()
        self._sheet.close()
        self._sheet = None

    def _write(self, text: str) -> None:
        self._pending.append(text)
        self._pending_chars += len(text)
        if self._pending_chars >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._bytes += self._sheet.write("".join(self._pending).encode())
            self._pending.clear()
            self._pending_chars = 0

    def add_rows(self, rows: Sequence[Sequence[Any]]) -> bytes:
        """Render and compress rows; returns the bytes of the file produced so far."""
        kinds, letters = self._kinds, self._letters
        for values in rows:
            if self._sheet is None or self._row >= XLSX_MAX_ROWS or self._bytes >= _SHEET_MAX_BYTES:
                if self._sheet is not None:
                    self._close_sheet()
                self._open_sheet()
            self._row += 1
            r = self._row
            cells = [f'<row r="{r}">']
            for letter, kind, value in zip(letters, kinds, values, strict=True):
                if value is None:
                    continue
                if kind == _TEXT:
                    cells.append(
                        f'<c r="{letter}{r}" t="inlineStr"><is><t xml:space="preserve">'
                        f"{xlsx_text(value)}</t></is></c>"
                    )
                elif kind == _NUMBER:
                    cells.append(f'<c r="{letter}{r}"><v>{value}</v></c>')
                elif kind == _BOOL:
                    cells.append(f'<c r="{letter}{r}" t="b"><v>{1 if value else 0}</v></c>')
                else:
                    cells.append(f'<c r="{letter}{r}" s="1"><v>{value!r}</v></c>')
            cells.append("</row>")
            self._write("".join(cells))
        return self._out.take()

    def discard(self) -> None:
        """Drop an unfinished file (the export stopped): close the zip in memory so nothing
        is left open; what it writes is thrown away. A no-op once finish() ran."""
        if self._closed:
            return
        self._closed = True
        if self._sheet is not None:
            self._sheet.close()
            self._sheet = None
        self._zip.close()
        self._out.take()

    def finish(self) -> bytes:
        """Close the last sheet and write the workbook parts and the zip directory."""
        if self._sheet is None:
            self._open_sheet()  # no rows: still a valid workbook, with its header row
        self._close_sheet()
        n = self._sheets
        sheets = "".join(
            f'<sheet name="{"pages" if i == 1 else f"pages {i}"}" sheetId="{i}" r:id="rId{i}"/>'
            for i in range(1, n + 1)
        )
        rels = "".join(
            f'<Relationship Id="rId{i}" Type="{_NS_REL}/worksheet" '
            f'Target="worksheets/sheet{i}.xml"/>'
            for i in range(1, n + 1)
        )
        overrides = "".join(
            f'<Override PartName="/xl/worksheets/sheet{i}.xml" ContentType="{_CT_SHEET}"/>'
            for i in range(1, n + 1)
        )
        parts = {
            "xl/workbook.xml": (
                _XML_HEAD + f'<workbook xmlns="{_NS_MAIN}" xmlns:r="{_NS_REL}">'
                f"<sheets>{sheets}</sheets></workbook>"
            ),
            "xl/_rels/workbook.xml.rels": (
                _XML_HEAD + f'<Relationships xmlns="{_NS_PKG_REL}">{rels}'
                f'<Relationship Id="rId{n + 1}" Type="{_NS_REL}/styles" Target="styles.xml"/>'
                "</Relationships>"
            ),
            "xl/styles.xml": _STYLES,
            "_rels/.rels": _ROOT_RELS,
            "[Content_Types].xml": (
                _XML_HEAD
                + '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
                '<Default Extension="rels" '
                'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
                '<Default Extension="xml" ContentType="application/xml"/>'
                '<Override PartName="/xl/workbook.xml" ContentType="application/'
                'vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
                '<Override PartName="/xl/styles.xml" ContentType="application/'
                'vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
                f"{overrides}</Types>"
            ),
        }
        for name, text in parts.items():
            self._zip.writestr(name, text)
        self._zip.close()
        self._closed = True
        return self._out.take()


async def _join_thread(future: asyncio.Future[T]) -> T:
    """The result of work running in a thread, waited for even through a cancellation
    (a thread cannot be stopped, and what it works on must not be touched meanwhile);
    the cancellation is raised again once the thread is done."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


# --------------------------------------------------------------------------------------
# The snapshot connection


def _release(pooled: PoolProxiedConnection, invalidate: bool) -> None:
    if invalidate:
        pooled.invalidate()
    pooled.close()


@asynccontextmanager
async def _snapshot(db: ConnectionManager) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection inside a REPEATABLE READ, READ ONLY transaction.

    Its own BEGIN/COMMIT (not ConnectionManager.driver(), whose PgBouncer mode wraps a
    transaction that this one could not set the isolation of): behind a transaction-mode
    pooler the whole export is one transaction on one server connection.
    A domain error (404/422, raised before any row) rolls back and keeps the connection.
    Anything else (the consumer gone and the producer cancelled mid-COPY, a broken
    connection) terminates it: the socket closes at once, the server ends the COPY on its
    own, and the pool slot is free without waiting for a cancel round trip.
    """
    pooled = await db.engine.raw_connection()
    conn: asyncpg.Connection = pooled.driver_connection
    reusable = False
    try:
        await conn.execute(_BEGIN)
        try:
            yield conn
        except TrawlerError:
            await conn.execute("ROLLBACK")
            reusable = True
            raise
        await conn.execute("COMMIT")
        reusable = True
    except BaseException:
        if not reusable:
            conn.terminate()
        raise
    finally:
        await greenlet_spawn(_release, pooled, not reusable)


# --------------------------------------------------------------------------------------
# The export


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


# what the producer hands over: (bytes, rows in them), a failure, or None at the end
_Item = tuple[bytes, int] | _Failure | None


class Export:
    """One export in flight. Build it with open_export(); read chunks(); always aclose().

    `rows` counts the rows handed to the consumer so far; `total` is the number of rows
    in the snapshot when the export was opened with count=True.
    """

    def __init__(
        self,
        db: ConnectionManager,
        tenant: str,
        job_id: uuid.UUID,
        request: ExportRequest,
        *,
        count: bool = False,
    ) -> None:
        self.db = db
        self.tenant = tenant
        self.job_id = job_id
        self.request = request
        self.count = count
        self.columns: list[Column] = []
        self.total: int | None = None
        self.rows = 0
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._finished = False

    @property
    def filename(self) -> str:
        suffix = "" if self.request.status == "all" else f"-{self.request.status}"
        return f"job-{self.job_id}{suffix}.{self.request.format}"

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.request.format]

    async def _start(self) -> None:
        self._started = time.perf_counter()
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._produce(), name=f"trawler-export-{self.job_id}")
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            await self.aclose()
            raise

    # ---------------------------------------------------------------- producer

    async def _produce(self) -> None:
        ready = self._ready
        assert ready is not None
        try:
            async with _snapshot(self.db) as conn:
                await self._plan(conn)
                ready.set_result(None)
                if self.request.format == "xlsx":
                    await self._produce_xlsx(conn)
                else:
                    await self._produce_copy(conn)
            await self._queue.put(None)
        except asyncio.CancelledError:
            if not ready.done():
                ready.cancel()
            raise
        except Exception as error:
            if not ready.done():
                # nothing was sent yet: the caller answers it (404, 422, 503)
                ready.set_exception(error)
                return
            logger.exception(
                "export of job %s (%s) failed after %d rows",
                self.job_id,
                self.request.format,
                self.rows,
            )
            await self._queue.put(_Failure(error))

    async def _plan(self, conn: asyncpg.Connection) -> None:
        # the first statement of the transaction: it takes the snapshot
        row = await conn.fetchrow(_JOB_SQL, self.job_id, self.tenant)
        if row is None:
            raise NotFound(f"job {self.job_id} not found")
        self.columns = resolve_columns(list(row[0]), self.request.fields, self.request.format)
        if self.count:
            where = _where(self.job_id, self.request.status)
            self.total = int(await conn.fetchval(f"SELECT count(*) {where}"))

    async def _produce_copy(self, conn: asyncpg.Connection) -> None:
        fmt = self.request.format
        frames: Callable[[bytes], tuple[bytes, int]]
        lines: _JsonLines | None = None
        if fmt == "csv":
            frames = _CsvFrames()
        else:
            lines = _JsonLines([key for key, _ in json_columns(self.columns)])
            frames = _JsonArray(lines) if fmt == "json" else lines
        queue = self._queue
        batch: list[bytes] = []
        size = rows = 0

        async def sink(data: bytes) -> None:
            # what one socket read brought: often a few KiB when the reader keeps up. Sent
            # one by one, each would cost a queue hand-off, a send and a write syscall
            nonlocal size, rows
            framed, n = frames(data)
            batch.append(framed)
            size += len(framed)
            rows += n
            if size >= BATCH_BYTES:
                await queue.put((b"".join(batch), rows))
                batch.clear()
                size = rows = 0

        await conn.copy_from_query(
            select_sql(self.job_id, self.columns, self.request),
            output=sink,
            format="csv" if fmt == "csv" else "text",
            null=None if fmt == "csv" else "null",
            timeout=EXPORT_TIMEOUT_S,
        )
        if lines is not None:
            lines.close()
        if size:
            await queue.put((b"".join(batch), rows))

    async def _produce_xlsx(self, conn: asyncpg.Connection) -> None:
        writer = XlsxStream(self.columns)
        try:
            cursor = await conn.cursor(select_sql(self.job_id, self.columns, self.request))
            rows = await cursor.fetch(XLSX_BATCH_ROWS)
            while rows:
                # render and deflate one batch in a thread while the next one is fetched
                rendering = asyncio.ensure_future(asyncio.to_thread(writer.add_rows, rows))
                try:
                    following = await cursor.fetch(XLSX_BATCH_ROWS)
                finally:
                    data = await _join_thread(rendering)
                await self._queue.put((data, len(rows)))
                rows = following
            finishing = asyncio.ensure_future(asyncio.to_thread(writer.finish))
            await self._queue.put((await _join_thread(finishing), 0))
        finally:
            writer.discard()

    # ---------------------------------------------------------------- consumer

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file in chunks of up to about SEND_BYTES. Raises ExportFailed if the export
        breaks off after it started (what was sent is then an incomplete file)."""
        head = self._head()
        if head:
            yield head
        ended = False
        while not ended:
            parts: list[bytes] = []
            size = rows = 0
            item = await self._queue.get()
            while True:
                if item is None:
                    ended = True
                    break
                if isinstance(item, _Failure):
                    raise ExportFailed(
                        f"export of job {self.job_id} failed after {self.rows} rows: {item.error}"
                    ) from item.error
                data, n = item
                parts.append(data)
                size += len(data)
                rows += n
                if size >= SEND_BYTES or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            self.rows += rows
            if size:
                yield b"".join(parts)
        if self.request.format == "json":
            yield b"\n]\n"
        self._finished = True
        logger.info(
            "exported job %s as %s: %d rows in %.2fs",
            self.job_id,
            self.request.format,
            self.rows,
            time.perf_counter() - self._started,
        )

    def _head(self) -> bytes:
        fmt = self.request.format
        if fmt == "csv":
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\r\n").writerow(c.name for c in self.columns)
            header = buffer.getvalue().encode()
            return UTF8_BOM + header if self.request.bom else header
        if fmt == "json":
            return b"[\n"
        return b""

    async def aclose(self) -> None:
        """Stop the producer if it still runs and release its connection. Idempotent."""
        task = self._task
        if task is None:
            return
        if not task.done():
            if not self._finished:
                logger.info(
                    "export of job %s (%s) stopped by its reader after %d rows",
                    self.job_id,
                    self.request.format,
                    self.rows,
                )
            task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # mark it retrieved: logged or handed over already
        ready = self._ready
        if ready is not None and ready.done() and not ready.cancelled():
            ready.exception()


async def open_export(
    db: ConnectionManager,
    tenant: str,
    job_id: uuid.UUID,
    request: ExportRequest,
    *,
    count: bool = False,
) -> Export:
    """Start an export of the tenant's job: returns once the snapshot is taken, the job
    found and the columns resolved (NotFound, Unprocessable and database errors are
    raised here, before anything was sent). The caller must aclose() the export."""
    export = Export(db=db, tenant=tenant, job_id=job_id, request=request, count=count)
    await export._start()
    return export
