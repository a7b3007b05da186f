"""Export benchmark: GET /api/v1/export/jobs/{id} in every format beside PostgreSQL's own
COPY of the same rows, in one run.

    python bench/export/run.py [--rows 1000000] [--rounds 3] [--formats csv,jsonl,json,xlsx]

One run, on a database of its own (``trawler_bench_export_<pid>`` on --database-url,
default postgresql://postgres@127.0.0.1:5432/postgres; dropped afterwards unless --keep;
--db-name NAME --reuse runs on what a --keep run left there):

1. migrates it, inserts one finished scrape job of --rows pages with 5 extract fields
   (title, price, description, sku, tags: a list) whose values hold commas, quotes, line
   breaks and non-ASCII text, 5% of them failed pages; VACUUM ANALYZE; an API key;
2. starts `trawler serve --no-worker` (uvicorn, uvloop, httptools) as its own process;
3. the reference: `psql -c "\\copy (<the CSV export's own SELECT>) to '/dev/null' csv"`,
   PostgreSQL formatting the same rows straight to /dev/null;
4. each format once untimed, written to a temporary file and checked (every row there:
   CSV parsed by the csv module, JSONL/JSON lines counted and the ends parsed, the XLSX
   sheet's rows counted), then --rounds timed rounds in alternating order, each export
   downloaded by curl to /dev/null (same byte count as the checked file); during each, the
   server's RSS is sampled every 10 ms (growth = peak - the RSS just before the request),
   with its CPU time and how busy the whole machine was.

Prints a Markdown table (and --json FILE writes the raw numbers). Targets (issue 5): CSV and
JSONL at least 50% of COPY's rows/s, server RSS growth under 100 MB, XLSX >= 20,000 rows/s.
Other load on the machine moves every number: compare the same-run ratios.
"""

# ruff: noqa: E402  (the import path is fixed before the imports)
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.migrations import upgrade_to_head
from app.services import apikeys
from app.services import export as export_service

JOB_ID = uuid.UUID("00000000-0000-4000-8000-00000000e590")
TENANT = "bench"
EXTRACT = ("title", "price", "description", "sku", "tags")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

SEED_JOB = """
INSERT INTO jobs (id, tenant, kind, status, spec, total, succeeded, failed,
                  started_at, finished_at)
VALUES ($1, $2, 'scrape', 'completed', $3::jsonb, $4, $4 - $4 / 20, $4 / 20, now(), now())
"""
# one batch of pages (ids lo..hi), with their tasks
SEED_PAGES = """
WITH t AS (
    INSERT INTO tasks (job_id, url, url_hash, host, status, attempts)
    SELECT $1, 'https://shop.example/p/' || g,
           sha256(convert_to('https://shop.example/p/' || g, 'UTF8')), 'shop.example',
           CASE WHEN g % 20 = 0 THEN 'failed' ELSE 'succeeded' END, 1
    FROM generate_series($2::int, $3::int) g
    RETURNING id, url, status
)
INSERT INTO pages (job_id, task_id, url, final_url, status_code, ok, depth, content_type,
                   elapsed_ms, data, error, fetched_at)
SELECT $1, t.id, t.url, CASE WHEN t.status = 'failed' THEN NULL ELSE t.url END,
       CASE WHEN t.status = 'failed' THEN 503 ELSE 200 END, t.status = 'succeeded',
       1 + t.id % 3, 'text/html', (t.id % 900)::int,
       CASE WHEN t.status = 'failed' THEN '{}'::jsonb ELSE jsonb_build_object(
           'title', 'Product ' || t.id || ' \u2013 \u201cDeluxe\u201d, size ' || (t.id % 50),
           'price', ((t.id % 10000) / 100.0)::numeric(10, 2)::text,
           'description', 'A fine item, made of steel; "heavy duty"'
               || CASE WHEN t.id % 7 = 0 THEN E'\\nsecond line' ELSE '' END
               || ' \u00fcn\u00efc\u00f6d\u00e9 \u20ac',
           'sku', 'SKU-' || lpad(t.id::text, 8, '0'),
           'tags', jsonb_build_array('tag' || (t.id % 13), 'tag' || (t.id % 17)))
       END,
       CASE WHEN t.status = 'failed' THEN 'HTTP 503: Service Unavailable' END,
       now() - make_interval(secs => t.id / 1000.0)
FROM t
"""


@dataclass
class Run:
    case: str
    round: int
    rows: int
    seconds: float
    bytes: int = 0
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    server_cpu_s: float = 0.0
    machine_busy: float = 0.0
    ttfb_s: float = 0.0
    busy_before: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_peak_mb - self.rss_before_mb


@dataclass
class Results:
    rows: int
    machine: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    checked: dict[str, dict[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------------------- /proc


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE / 2**20


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_quiet(limit_s: float, *, busy_below: float = 0.3) -> float:
    """Wait (up to limit_s) for a second in which the machine is mostly idle: other work on
    a shared box slows every pipeline down, a three-process one (PostgreSQL, server, curl)
    more than psql's. Returns how busy the last second was."""
    deadline = time.monotonic() + limit_s
    while True:
        before = machine_ticks()
        time.sleep(1.0)
        busy, total = machine_ticks()
        share = (busy - before[0]) / max(1, total - before[1])
        if share < busy_below or time.monotonic() >= deadline:
            return share


class Sampler:
    """The server's peak RSS, its CPU time and the machine's busy share over a window."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self.before = rss_mb(self.pid)
        self.peak = self.before
        self._cpu = cpu_seconds(self.pid)
        self._busy = machine_ticks()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))
        self.cpu = cpu_seconds(self.pid) - self._cpu
        busy, total = machine_ticks()
        self.busy = (busy - self._busy[0]) / max(1, total - self._busy[1])


# ------------------------------------------------------------------------------- setup


def dsn(url: str, database: str | None = None) -> str:
    base = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    if database is None:
        return base
    head, _, query = base.partition("?")
    return head.rsplit("/", 1)[0] + "/" + database + (f"?{query}" if query else "")


async def create_database(url: str, name: str) -> None:
    conn = await asyncpg.connect(dsn(url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    engine = create_async_engine(dsn(url, name).replace("postgresql://", "postgresql+asyncpg://"))
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()


async def drop_database(url: str, name: str) -> None:
    conn = await asyncpg.connect(dsn(url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def seed(url: str, rows: int) -> None:
    spec = json.dumps({"urls": [], "extract": {name: {"css": f".{name}"} for name in EXTRACT}})
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await conn.execute(SEED_JOB, JOB_ID, TENANT, spec, rows)
        batch = 200_000
        for lo in range(1, rows + 1, batch):
            hi = min(rows, lo + batch - 1)
            await conn.execute(SEED_PAGES, JOB_ID, lo, hi)
            print(f"  seeded {hi:,} pages ({time.perf_counter() - started:.0f}s)", flush=True)
        await conn.execute("VACUUM ANALYZE pages")
        await conn.execute("VACUUM ANALYZE tasks")
    finally:
        await conn.close()


async def make_key(url: str) -> str:
    db = ConnectionManager(Settings(database_url=url), application_name="trawler-bench")
    try:
        async with db.session() as session:
            _, key = await apikeys.create_key(session, "bench", TENANT)
        return key
    finally:
        await db.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(url: str, port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAWLER_")}
    env.update(
        TRAWLER_DATABASE_URL=url,
        TRAWLER_HOST="127.0.0.1",
        TRAWLER_PORT=str(port),
        TRAWLER_DATA_DIR=str(data_dir),
        TRAWLER_LOG_LEVEL="WARNING",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--no-worker"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        time.sleep(0.1)
    raise RuntimeError("server did not start")


# ------------------------------------------------------------------------------- cases


def reference_sql() -> str:
    columns = export_service.resolve_columns(list(EXTRACT), (), "csv")
    return export_service.select_sql(JOB_ID, columns, export_service.ExportRequest())


def run_copy(url: str) -> float:
    sql = reference_sql()
    started = time.perf_counter()
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn(url), "-c",
         f"\\copy ({sql}) to '/dev/null' csv"],
        check=True,
    )  # fmt: skip
    return time.perf_counter() - started


def curl(url: str, key: str, out: str) -> tuple[int, int, float, float]:
    """(status, bytes, time to first byte, total seconds) as curl measured them."""
    result = subprocess.run(
        ["curl", "-sS", "-o", out, "-H", f"Authorization: Bearer {key}",
         "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}", url],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    code, size, ttfb, total = result.stdout.split()
    return int(code), int(size), float(ttfb), float(total)


def check_file(fmt: str, path: Path, rows: int) -> dict[str, Any]:
    """Every row is in the file, and it parses."""
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            count = sum(1 for _ in reader)
        assert header[:7] == list(export_service.TABLE_COLUMNS), header
    elif fmt == "jsonl":
        count = 0
        with path.open("rb") as f:
            first = json.loads(f.readline())
            count = 1 + sum(1 for _ in f)
        assert first["url"].startswith("https://shop.example/"), first
    elif fmt == "json":
        with path.open("rb") as f:
            assert f.readline() == b"[\n"
            count = sum(1 for _ in f) - 1  # the closing "]" line
            f.seek(-3, os.SEEK_END)
            assert f.read() == b"\n]\n"
    else:
        count = 0
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.startswith("xl/worksheets/"))
            for name in names:
                with z.open(name) as sheet:
                    tail = b""
                    while chunk := sheet.read(1 << 20):
                        count += (tail + chunk).count(b"<row ")
                        tail = chunk[-4:]
                count -= 1  # each sheet's header row
    assert count == rows, f"{fmt}: {count} rows in the file, {rows} expected"
    return {"rows": count, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------- run


async def prepare(args: argparse.Namespace, name: str, url: str) -> tuple[bool, int]:
    """(created, size of `pages` in bytes): a fresh database, or with --reuse the one
    a previous --keep run left (when it holds the job with --rows pages)."""
    if args.reuse:
        with contextlib.suppress(asyncpg.InvalidCatalogNameError):
            conn = await asyncpg.connect(url)
            try:
                rows = await conn.fetchval("SELECT count(*) FROM pages WHERE job_id = $1", JOB_ID)
                if rows == args.rows:
                    print(f"database {name}: reusing its {rows:,} pages", flush=True)
                    return False, await conn.fetchval("SELECT pg_total_relation_size('pages')")
            finally:
                await conn.close()
    print(f"database {name}: migrating and seeding {args.rows:,} pages", flush=True)
    await create_database(args.database_url, name)
    await seed(url, args.rows)
    conn = await asyncpg.connect(url)
    try:
        return True, await conn.fetchval("SELECT pg_total_relation_size('pages')")
    finally:
        await conn.close()


def main(args: argparse.Namespace) -> Results:
    """Synchronous on purpose: Ctrl-C stops it at once, and the cleanup below still runs."""
    name = args.db_name or f"trawler_bench_export_{os.getpid()}"
    url = dsn(args.database_url, name)
    results = Results(rows=args.rows, machine=machine_info(args.database_url))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    server: subprocess.Popen[bytes] | None = None
    data_dir = Path(tempfile.mkdtemp(prefix="trawler-bench-export-"))
    created = False
    try:
        created, size = asyncio.run(prepare(args, name, url))
        results.machine["pages_relation_mb"] = round(size / 2**20)
        key = asyncio.run(make_key(url))
        port = free_port()
        server = start_server(url, port, data_dir)
        time.sleep(1.0)
        results.machine["server_rss_idle_mb"] = round(rss_mb(server.pid), 1)
        base = f"http://127.0.0.1:{port}/api/v1/export/jobs/{JOB_ID}"
        run_copy(url)  # warm-up: the table into the caches

        print("checking every format once (untimed)", flush=True)
        for fmt in formats:
            target = data_dir / f"check.{fmt}"
            with Sampler(server.pid) as sample:
                code, size, _, total = curl(f"{base}?format={fmt}", key, str(target))
            assert code == 200, (fmt, code)
            results.checked[fmt] = {
                **check_file(fmt, target, args.rows),
                "seconds": total,
                "rss_peak_mb": round(sample.peak, 1),
            }
            target.unlink()
            print(f"  {fmt}: {args.rows:,} rows, {size:,} bytes, ok", flush=True)

        cases = ["copy", *formats]
        for round_ in range(1, args.rounds + 1):
            order = cases if round_ % 2 else list(reversed(cases))
            for case in order:
                idle = wait_quiet(args.wait_quiet)
                if case == "copy":
                    busy_before = machine_ticks()
                    seconds = run_copy(url)
                    busy, total = machine_ticks()
                    run = Run(case, round_, args.rows, seconds)
                    run.machine_busy = (busy - busy_before[0]) / max(1, total - busy_before[1])
                else:
                    with Sampler(server.pid) as sample:
                        code, size, ttfb, seconds = curl(f"{base}?format={case}", key, "/dev/null")
                    assert code == 200, (case, code)
                    assert size == results.checked[case]["bytes"], (case, size)
                    run = Run(
                        case, round_, args.rows, seconds, bytes=size,
                        rss_before_mb=sample.before, rss_peak_mb=sample.peak,
                        server_cpu_s=sample.cpu, machine_busy=sample.busy, ttfb_s=ttfb,
                    )  # fmt: skip
                run.busy_before = idle
                results.runs.append(run)
                print(
                    f"  round {round_} {case:5}: {run.rows_per_s:10,.0f} rows/s "
                    f"({run.seconds:.2f}s), RSS +{run.rss_growth_mb:.1f} MB, "
                    f"machine busy {run.machine_busy:.0%} (before: {idle:.0%})",
                    flush=True,
                )
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
        if created and not args.keep:
            asyncio.run(drop_database(args.database_url, name))
    return results


def machine_info(url: str) -> dict[str, Any]:
    version = subprocess.run(
        ["psql", "-X", "-A", "-t", "-d", dsn(url), "-c", "SHOW server_version"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": version,
        "load_before": os.getloadavg(),
    }


def report(results: Results) -> str:
    by_case: dict[str, list[Run]] = {}
    for run in results.runs:
        by_case.setdefault(run.case, []).append(run)
    copy = statistics.median(r.rows_per_s for r in by_case["copy"])
    lines = [
        "| case | rows/s (median) | per round | x COPY (median of same-round ratios) | seconds "
        "| server RSS growth in the request (max) | server peak RSS over idle "
        "| server CPU | machine busy |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    copy_by_round = {r.round: r.rows_per_s for r in by_case["copy"]}
    for case, runs in by_case.items():
        rate = statistics.median(r.rows_per_s for r in runs)
        same_round = statistics.median(r.rows_per_s / copy_by_round[r.round] for r in runs)
        per_round = " / ".join(f"{r.rows_per_s:,.0f}" for r in runs)
        label = (
            "psql \\copy (same SELECT) to /dev/null" if case == "copy" else f"GET ?format={case}"
        )
        rss = "-" if case == "copy" else f"{max(r.rss_growth_mb for r in runs):.1f} MB"
        idle = results.machine["server_rss_idle_mb"]
        peaks = [r.rss_peak_mb for r in runs]
        if case in results.checked:  # the first, untimed export of this format
            peaks.append(results.checked[case]["rss_peak_mb"])
        over_idle = "-" if case == "copy" else f"+{max(peaks) - idle:.1f} MB"
        cpu = (
            "-"
            if case == "copy"
            else f"{statistics.median(r.server_cpu_s / r.seconds for r in runs):.0%}"
        )
        lines.append(
            f"| {label} | {rate:,.0f} | {per_round} | {rate / copy:.2f}x "
            f"({same_round:.2f}x) | "
            f"{statistics.median(r.seconds for r in runs):.2f} | {rss} | {over_idle} | {cpu} | "
            f"{statistics.median(r.machine_busy for r in runs):.0%} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default="csv,jsonl,json,xlsx")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each case, wait up to this many seconds for the machine to go idle",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--db-name", help="database name [trawler_bench_export_<pid>]")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="use --db-name as a previous --keep run left it (when it has --rows pages)",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    outcome = main(arguments)
    print()
    print(json.dumps(outcome.machine))
    print(report(outcome))
    if arguments.json:
        raw = {**asdict(outcome), "runs": [asdict(r) for r in outcome.runs]}
        arguments.json.write_text(json.dumps(raw, indent=2, default=str))
