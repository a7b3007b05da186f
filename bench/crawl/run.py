"""Crawl benchmark (issue 4): Trawler beside Scrapy and a bare asyncio crawler, one site.

    .venv/bin/python bench/crawl/run.py                       # 5,000 and 20,000 pages
    .venv/bin/python bench/crawl/run.py --pages 20000 --only trawler --workers 1
    .venv/bin/python bench/crawl/run.py --pages 2000 --no-profile     # a quick look

For each site size (``--pages``, comma-separated, default 5000,20000):

1. sitegen.py writes a deterministic synthetic shop of exactly that many pages (product
   pages 8-15 KB with ~20 links and five fields, list and category pages, an index) to
   ``--site-dir`` (reused when already there) and a private nginx (nginx_site.py) serves it
   on 127.0.0.1 and a free port;
2. the crawlers run one after the other on the same site, every page's fields checked
   against the generator's manifest:
   - bare: bare.py, aiohttp + selectolax + uvloop, 64 concurrent, set dedupe, JSONL;
   - trawler: a fresh database (``--db-name``, dropped and recreated per run) migrated to
     head, N ``trawler worker`` processes (``--workers``, default 1 then 2) with
     TRAWLER_ALLOW_PRIVATE_NETWORKS=true, one crawl submitted through
     app.services.jobs.submit_job (seed ``/``, max_pages = site size, per_host_concurrency
     64, the five fields as CSS extract spec), pages read back from PostgreSQL;
   - scrapy: scrapy_crawl.py, a CrawlSpider with the same extraction, JSONL feed,
     CONCURRENT_REQUESTS(_PER_DOMAIN)=64, no AutoThrottle, in a venv that has Scrapy
     (``--scrapy-python``; by default created at /tmp/trawler-bench-venv from
     bench/crawl/requirements.txt when this interpreter lacks Scrapy);
3. pages/s is counted from the first to the last page stored (Trawler: pages.fetched_at;
   the others: the time each page's record was written), peak RSS is each crawler
   process's VmHWM (Trawler workers: read from /proc; the others read their own at the
   end: getrusage's ru_maxrss would include this parent's RSS, inherited through exec);
4. with ``--profile`` (default on), one more 1-worker Trawler crawl of the largest site
   runs under ``py-spy record`` and is summarised by pyspy_summary.py.

The markdown report goes to stdout (and ``--markdown FILE``), raw results to ``--json``.
Other load on the machine moves absolute numbers; compare the same-run ratios.
"""

# ruff: noqa: E402  (the import path is fixed before the imports)
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
from nginx_site import NginxSite
from pyspy_summary import load as load_profile
from pyspy_summary import render as render_profile
from sitegen import FIELDS, generate

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DB = "trawler_bench_crawl"
BENCH_VENV = Path("/tmp/trawler-bench-venv")
CRAWLERS = ("bare", "trawler", "scrapy")
TENANT = "bench"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc helpers


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with contextlib.suppress(OSError, ValueError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)
    return 0, 0


async def wait_quiet(limit_s: float, threshold: float = 0.25) -> float:
    """Wait (up to ``limit_s``) until the machine's cores are less than ``threshold`` busy
    over one second; returns the last share seen (other people's work on a shared box)."""
    deadline = time.monotonic() + limit_s
    while True:
        before = machine_ticks()
        await asyncio.sleep(1.0)
        after = machine_ticks()
        share = (after[0] - before[0]) / max(1, after[1] - before[1])
        if share < threshold or time.monotonic() >= deadline:
            if share >= threshold:
                log(
                    f"machine still {share:.0%} busy after waiting {limit_s:.0f}s; measuring anyway"
                )
            return share


class Meter:
    """CPU of some processes and how busy the whole machine was, over an interval."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.before = {pid: proc_cpu(pid) or 0.0 for pid in pids}
        self.ticks = machine_ticks()

    def stop(self) -> tuple[float, float]:
        """(CPU seconds of the processes, share of the machine's cores busy)."""
        used = sum((proc_cpu(pid) or self.before[pid]) - self.before[pid] for pid in self.pids)
        busy, total = machine_ticks()
        share = (busy - self.ticks[0]) / max(1, total - self.ticks[1])
        return used, share


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    crawler: str  # bare | scrapy | trawler
    label: str
    size: int
    workers: int = 1
    pages: int = 0  # distinct pages stored
    ok: int = 0
    fields_ok: int = 0  # product pages whose five fields equal the manifest's
    products: int = 0
    span_s: float = 0.0  # first to last page stored
    wall_s: float = 0.0  # start (submit) to end (job completed / process done)
    cpu_s: float = 0.0  # crawler process(es), over the crawl
    pg_cpu_s: float = 0.0  # PostgreSQL backends of the bench database (Trawler)
    nginx_cpu_s: float = 0.0
    machine_busy: float = 0.0
    peak_rss_mb: list[float] = field(default_factory=list)  # one per process
    idle_rss_mb: list[float] = field(default_factory=list)  # Trawler workers before the crawl
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.pages / self.span_s if self.span_s > 0 else 0.0


def check_records(records: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, int]:
    """Distinct pages, OK pages and products whose fields match, from crawler records."""
    expected: dict[str, list[str]] = manifest["expected"]
    names = list(FIELDS)
    seen: set[str] = set()
    ok = matched = 0
    for record in records:
        url = record.get("url") or ""
        if url in seen:
            continue
        seen.add(url)
        if record.get("ok", record.get("status") == 200):
            ok += 1
        want = expected.get(urlsplit(url).path)
        if want is not None and [record.get(n) for n in names] == want:
            matched += 1
    return {"pages": len(seen), "ok": ok, "fields_ok": matched}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open("rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------- bare and Scrapy


def run_process_crawler(
    crawler: str,
    command: list[str],
    out: Path,
    site: NginxSite,
    manifest: dict[str, Any],
    log_file: Path,
) -> Result:
    """Run a one-process crawler that writes JSONL and prints a JSON summary line."""
    size = manifest["pages"]
    result = Result(crawler, crawler, size, products=manifest["products"])
    nginx = Meter(site.worker_pids())
    started = time.time()
    with log_file.open("wb") as err:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, check=False, cwd=ROOT)
    result.wall_s = time.time() - started
    result.nginx_cpu_s, result.machine_busy = nginx.stop()
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    summary: dict[str, Any] = {}
    with contextlib.suppress(IndexError, ValueError):
        summary = json.loads(lines[-1])
    if proc.returncode != 0 or not summary:
        tail = log_file.read_text(errors="replace")[-1500:]
        result.error = f"exit {proc.returncode}: {tail}"
        return result
    checked = check_records(read_jsonl(out), manifest)
    result.pages, result.ok, result.fields_ok = (
        checked["pages"],
        checked["ok"],
        checked["fields_ok"],
    )
    result.span_s = float(summary["last"]) - float(summary["first"])
    result.cpu_s = float(summary["cpu_s"])
    result.peak_rss_mb = [summary["maxrss_kb"] / 1024]
    result.extra = {
        k: v for k, v in summary.items() if k not in ("first", "last", "cpu_s", "maxrss_kb")
    }
    result.extra["records"] = int(summary.get("pages", 0))
    return result


def scrapy_python(args: argparse.Namespace) -> str:
    if args.scrapy_python:
        return str(args.scrapy_python)
    probe = subprocess.run(
        [sys.executable, "-c", "import scrapy"], capture_output=True, check=False
    )
    if probe.returncode == 0:
        return sys.executable
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {BENCH_VENV} with bench/crawl/requirements.txt (Scrapy, py-spy)")
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(HERE / "requirements.txt")],
            check=True,
        )
    return str(python)


def pyspy_binary() -> str | None:
    for candidate in (Path(sys.executable).parent / "py-spy", BENCH_VENV / "bin" / "py-spy"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("py-spy")


# --------------------------------------------------------------------------- Trawler


def plain_dsn(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def with_database(url: str, name: str) -> str:
    head, sep, query = url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}{sep}{query}"


# what a bench-database backend is busy with (pg_stat_activity.query, first 1 KB)
_SQL_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("WITH RECURSIVE hs(host)",), "claim: pick and lock hosts"),
    (("WITH h AS ( SELECT * FROM unnest(",), "claim: lease tasks"),
    (("WITH v AS ( SELECT * FROM unnest(",), "complete: task states + pages"),
    (("INSERT INTO tasks",), "enqueue discovered links"),
    (("UPDATE workers",), "worker heartbeat"),
    (("COMMIT",), "COMMIT (WAL flush)"),
    (("UPDATE jobs SET",), "job status transition"),
)


def sql_kind(query: str) -> str:
    text = " ".join(query.split())
    for markers, name in _SQL_KINDS:
        if all(marker in text for marker in markers):
            return name
    return text[:60]


class TrawlerBench:
    def __init__(self, args: argparse.Namespace, out_dir: Path) -> None:
        self.admin_url = plain_dsn(args.database_url)
        if not re.fullmatch(r"trawler_bench_[a-z0-9_]+", args.db_name):
            raise SystemExit(f"--db-name must look like trawler_bench_<name>, not {args.db_name}")
        self.db_name = args.db_name
        self.url = with_database(self.admin_url, self.db_name)
        self.args = args
        self.out_dir = out_dir

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def recreate(self) -> None:
        await self._admin(
            f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)',
            f'CREATE DATABASE "{self.db_name}"',
        )
        from sqlalchemy.ext.asyncio import create_async_engine

        from app.config import Settings
        from app.database.migrations import upgrade_to_head

        engine = create_async_engine(Settings(database_url=self.url).database_url or "")
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await self._admin(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAWLER_")}
        env.update(
            {
                "TRAWLER_DATABASE_URL": self.url,
                "TRAWLER_ALLOW_PRIVATE_NETWORKS": "true",
                "TRAWLER_WORKER_CONCURRENCY": str(self.args.concurrency),
                "TRAWLER_LOG_LEVEL": "WARNING",
                "TRAWLER_DATA_DIR": str(self.out_dir / "trawler-data"),
            }
        )
        for item in self.args.worker_env:
            key, _, value = item.partition("=")
            env[key] = value
        return env

    def worker_command(self) -> list[str]:
        script = Path(sys.executable).parent / "trawler"
        if script.exists():
            return [str(script), "worker"]
        return [sys.executable, "-c", "from app.cli import main; main()", "worker"]

    async def _backend_pids(self, conn: asyncpg.Connection) -> list[int]:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return [r["pid"] for r in rows]

    async def submit(self, base: str, size: int) -> str:
        from app.api.schemas import CrawlCreate
        from app.config import Settings
        from app.database.connection import ConnectionManager
        from app.scraper.ssrf import SSRFGuard
        from app.services.jobs import submit_job

        request = CrawlCreate.model_validate(
            {
                "seeds": [f"{base}/"],
                "extract": {name: {"css": css, "value": "text"} for name, css in FIELDS.items()},
                "follow": {"max_pages": size, "max_depth": 20, "same_site": True},
                "politeness": {
                    "respect_robots": True,
                    "per_host_concurrency": self.args.concurrency,
                    "delay_ms": 0,
                },
                "options": {"timeout_s": 30},
            }
        )
        settings = Settings(database_url=self.url, allow_private_networks=True)
        db = ConnectionManager(settings, application_name="trawler-bench-submit")
        try:
            async with db.session() as session:
                job, _ = await submit_job(
                    session, TENANT, request, guard=SSRFGuard(allow_private=True)
                )
        finally:
            await db.dispose()
        return str(job.id)

    async def run(
        self,
        site: NginxSite,
        manifest: dict[str, Any],
        workers: int,
        *,
        profile_to: Path | None = None,
    ) -> Result:
        size = manifest["pages"]
        label = f"trawler {workers} worker{'s' if workers > 1 else ''}"
        if self.args.host_lease_cap:
            label += f", host lease cap {self.args.host_lease_cap} (diagnostic)"
        if profile_to is not None:
            label += " (py-spy)"
        result = Result("trawler", label, size, workers=workers, products=manifest["products"])
        await self.recreate()
        procs: list[subprocess.Popen[bytes]] = []
        pyspy: subprocess.Popen[bytes] | None = None
        try:
            env = self.worker_env()
            for k in range(workers):
                name = f"trawler-{size}-{workers}w{'-pyspy' if profile_to else ''}-{k}.log"
                err = (self.out_dir / name).open("wb")
                procs.append(
                    subprocess.Popen(
                        self.worker_command(),
                        env=env,
                        cwd=ROOT,
                        stdin=subprocess.DEVNULL,
                        stdout=err,
                        stderr=subprocess.STDOUT,
                    )
                )
                err.close()
            pids = [p.pid for p in procs]
            conn = await asyncpg.connect(self.url)
            try:
                await self._wait_registered(conn, procs)
                result.idle_rss_mb = [proc_memory(pid).get("VmRSS", 0) / 1024 for pid in pids]
                if profile_to is not None:
                    binary = pyspy_binary()
                    if binary is None:
                        raise RuntimeError("py-spy not found (pip install py-spy)")
                    pyspy = subprocess.Popen(
                        [
                            binary,
                            "record",
                            "--pid",
                            str(pids[0]),
                            "--rate",
                            str(self.args.profile_rate),
                            "--format",
                            "raw",
                            "--output",
                            str(profile_to),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=(self.out_dir / "py-spy.log").open("wb"),
                    )
                    await asyncio.sleep(1.0)  # attached before the crawl starts
                backends0 = await self._backend_pids(conn)
                workers_meter = Meter(pids)
                pg_meter = Meter(backends0)
                nginx_meter = Meter(site.worker_pids())
                started = time.time()
                job_id = await self.submit(site.base_url, size)
                if self.args.host_lease_cap:
                    # diagnostic: more leases per host than per_host_concurrency (the API
                    # caps it at 64) while each worker still runs at most 64 fetches
                    await conn.execute(
                        "UPDATE hosts SET max_concurrency = $1", self.args.host_lease_cap
                    )
                status = await self._wait_done(conn, job_id, procs, result)
                result.wall_s = time.time() - started
                result.cpu_s, result.machine_busy = workers_meter.stop()
                result.nginx_cpu_s, _ = nginx_meter.stop()
                # backends opened during the crawl count from zero
                backends1 = await self._backend_pids(conn)
                pg_meter.before.update({p: 0.0 for p in backends1 if p not in pg_meter.before})
                pg_meter.pids = list(pg_meter.before)
                result.pg_cpu_s, _ = pg_meter.stop()
                result.peak_rss_mb = [proc_memory(pid).get("VmHWM", 0) / 1024 for pid in pids]
                if pyspy is not None:
                    pyspy.send_signal(signal.SIGINT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        pyspy.wait(30)
                    pyspy = None
                await self._verify(conn, job_id, manifest, result)
                result.extra["job_status"] = status
            finally:
                await conn.close()
        except Exception as error:
            result.error = f"{type(error).__name__}: {error}"
            log(f"{label}: {result.error}")
        finally:
            if pyspy is not None and pyspy.poll() is None:
                pyspy.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pyspy.wait(30)
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            await self.drop()
        return result

    async def _wait_registered(
        self, conn: asyncpg.Connection, procs: list[subprocess.Popen[bytes]]
    ) -> None:
        wanted = {p.pid for p in procs}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {proc.pid} exited ({proc.returncode}) at start")
            rows = await conn.fetch("SELECT pid FROM workers WHERE state = 'running'")
            if wanted <= {r["pid"] for r in rows}:
                await asyncio.sleep(0.5)  # LISTEN connections established
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("workers did not register within 60 s")

    async def _wait_done(
        self,
        conn: asyncpg.Connection,
        job_id: str,
        procs: list[subprocess.Popen[bytes]],
        result: Result,
    ) -> str:
        last_done, last_change = -1, time.monotonic()
        running: list[int] = []  # leased tasks (claimed, in flight or waiting in a worker)
        starved = 0  # samples with nothing queued: the frontier, not the workers, is short
        while True:
            row = await conn.fetchrow(
                "SELECT status, total, queued, running, succeeded, failed FROM jobs "
                "WHERE id = $1::uuid",
                job_id,
            )
            if row is None:
                raise RuntimeError(f"job {job_id} vanished")
            if row["status"] in ("completed", "failed", "cancelled"):
                if running:
                    result.extra["mean_leased"] = round(statistics.mean(running), 1)
                    result.extra["queue_empty_share"] = round(starved / len(running), 3)
                return str(row["status"])
            done = row["succeeded"] + row["failed"]
            if done:
                running.append(row["running"])
                starved += row["queued"] == 0
            if done != last_done:
                last_done, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > self.args.stall:
                raise RuntimeError(
                    f"no progress for {self.args.stall:.0f} s at {done}/{row['total']} pages "
                    f"(status {row['status']})"
                )
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {proc.pid} exited ({proc.returncode}) mid-crawl")
            for k, proc in enumerate(procs):  # VmHWM is a high-water mark; keep it fresh
                hwm = proc_memory(proc.pid).get("VmHWM")
                if hwm:
                    result.extra[f"hwm_w{k}"] = hwm
            # a sampling profile of PostgreSQL: which statement each busy backend runs
            active = await conn.fetch(
                "SELECT query, wait_event_type FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'active' "
                "AND pid <> pg_backend_pid()"
            )
            pg_busy: dict[str, int] = result.extra.setdefault("pg_active_samples", {})
            pg_busy["(polls)"] = pg_busy.get("(polls)", 0) + 1
            for row in active:
                kind = sql_kind(row["query"] or "")
                if row["wait_event_type"] == "Lock":
                    kind += " (waiting for a lock)"
                pg_busy[kind] = pg_busy.get(kind, 0) + 1
            await asyncio.sleep(0.1)

    async def _verify(
        self, conn: asyncpg.Connection, job_id: str, manifest: dict[str, Any], result: Result
    ) -> None:
        row = await conn.fetchrow(
            "SELECT count(*) AS pages, count(*) FILTER (WHERE ok) AS ok, "
            "count(DISTINCT url) AS urls, extract(epoch FROM min(fetched_at)) AS first, "
            "extract(epoch FROM max(fetched_at)) AS last FROM pages WHERE job_id = $1::uuid",
            job_id,
        )
        records = [
            {"url": r["url"], "ok": r["ok"], **orjson.loads(r["data"])}
            for r in await conn.fetch(
                "SELECT url, ok, data::text AS data FROM pages WHERE job_id = $1::uuid", job_id
            )
        ]
        checked = check_records(records, manifest)
        tasks = await conn.fetch(
            "SELECT status, count(*) AS n FROM tasks WHERE job_id = $1::uuid GROUP BY status",
            job_id,
        )
        result.pages, result.ok, result.fields_ok = (
            checked["pages"],
            checked["ok"],
            checked["fields_ok"],
        )
        result.span_s = float(row["last"] or 0) - float(row["first"] or 0)
        # where a lease's time goes: pages.fetched_at is the storing transaction's start,
        # elapsed_ms the fetch as the worker timed it (event-loop lag included)
        timing = await conn.fetchrow(
            "SELECT count(DISTINCT fetched_at) AS commits, avg(elapsed_ms) AS fetch_mean, "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY elapsed_ms) AS fetch_p50, "
            "percentile_cont(0.9) WITHIN GROUP (ORDER BY elapsed_ms) AS fetch_p90 "
            "FROM pages WHERE job_id = $1::uuid",
            job_id,
        )
        # the frontier table after the crawl: dead row versions and index sizes that every
        # dedupe probe and claim walks through (each task row is updated twice)
        table = await conn.fetchrow(
            "SELECT n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, autovacuum_count, "
            "pg_total_relation_size('tasks') AS bytes, "
            "pg_relation_size('uq_tasks_job_url_hash') AS dedupe_index_bytes "
            "FROM pg_stat_user_tables WHERE relname = 'tasks'"
        )
        if table is not None:
            result.extra["tasks_table"] = dict(table)
        result.extra.update(
            {
                "page_rows": row["pages"],
                "tasks": {r["status"]: r["n"] for r in tasks},
                "store_commits": timing["commits"],
                "fetch_ms_mean": round(float(timing["fetch_mean"] or 0), 1),
                "fetch_ms_p50": round(float(timing["fetch_p50"] or 0), 1),
                "fetch_ms_p90": round(float(timing["fetch_p90"] or 0), 1),
            }
        )


# --------------------------------------------------------------------------- orchestration


def machine_facts() -> dict[str, str]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1024 / 1024:.0f} GiB"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def versions(scrapy_py: str | None) -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for name in ("aiohttp", "selectolax", "uvloop", "asyncpg", "sqlalchemy"):
        with contextlib.suppress(Exception):
            out[name] = version(name)
    if scrapy_py:
        probe = subprocess.run(
            [
                scrapy_py,
                "-c",
                "import scrapy, twisted; print(scrapy.__version__, twisted.__version__)",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0:
            out["scrapy"], out["twisted"] = probe.stdout.split()
    with contextlib.suppress(Exception):
        out["nginx"] = (
            subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
            .stderr.strip()
            .split("/")[-1]
        )
    return out


async def bench(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.pages.split(",") if s.strip()]
    only = set(args.only.split(",")) if args.only else set(CRAWLERS)
    unknown = only - set(CRAWLERS)
    if unknown:
        raise SystemExit(f"--only: unknown crawler(s) {sorted(unknown)}; pick from {CRAWLERS}")
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="trawler-bench-crawl-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"output files in {out_dir}")
    scrapy_py = scrapy_python(args) if "scrapy" in only else None
    trawler = TrawlerBench(args, out_dir) if "trawler" in only else None
    results: list[Result] = []
    profile_text: list[str] = []
    profile_meta: dict[str, Any] = {}
    manifests: dict[int, dict[str, Any]] = {}
    started = time.monotonic()
    for size in sizes:
        site_dir = Path(args.site_dir) / f"site-{size}-s{args.seed}"
        t0 = time.perf_counter()
        manifest = generate(site_dir, size, args.seed)
        manifests[size] = {k: v for k, v in manifest.items() if k not in ("paths", "expected")}
        log(
            f"site of {size:,} pages in {site_dir} ({time.perf_counter() - t0:.1f}s; "
            f"{manifest['products']:,} products, {manifest['bytes'] / 1e6:.0f} MB)"
        )
        keep = out_dir / f"nginx-{size}.error.log"
        with NginxSite(site_dir, workers=args.nginx_workers, keep_log=keep) as site:
            log(f"nginx serving it at {site.base_url}")
            for round_no in range(1, args.rounds + 1):
                for crawler in CRAWLERS:
                    if crawler not in only:
                        continue
                    if crawler == "trawler":
                        assert trawler is not None
                        for workers in worker_counts:
                            quiet = await wait_quiet(args.wait_quiet)
                            errors = site.errors()
                            result = await trawler.run(site, manifest, workers)
                            result.extra["busy_before"] = quiet
                            result.extra["nginx_errors"] = site.errors() - errors
                            results.append(_logged(result, round_no))
                        continue
                    out = out_dir / f"{crawler}-{size}-r{round_no}.jsonl"
                    if crawler == "bare":
                        command = [
                            sys.executable,
                            str(HERE / "bare.py"),
                            f"{site.base_url}/",
                            "--out",
                            str(out),
                            "--max-pages",
                            str(size),
                            "--concurrency",
                            str(args.concurrency),
                        ]
                    else:
                        assert scrapy_py is not None
                        command = [
                            scrapy_py,
                            str(HERE / "scrapy_crawl.py"),
                            f"{site.base_url}/",
                            "--out",
                            str(out),
                            "--concurrency",
                            str(args.concurrency),
                        ]
                    quiet = await wait_quiet(args.wait_quiet)
                    errors = site.errors()
                    log(f"{crawler}: crawling {size:,} pages")
                    result = run_process_crawler(
                        crawler, command, out, site, manifest, out_dir / f"{crawler}-{size}.log"
                    )
                    result.extra["busy_before"] = quiet
                    result.extra["nginx_errors"] = site.errors() - errors
                    results.append(_logged(result, round_no))
                    if not args.keep_output:
                        out.unlink(missing_ok=True)
            if trawler is not None and args.profile and size == max(sizes):
                profile_file = out_dir / f"trawler-{size}.pyspy.txt"
                await wait_quiet(args.wait_quiet)
                log(f"profiling one Trawler worker with py-spy ({size:,} pages)")
                errors = site.errors()
                result = await trawler.run(site, manifest, 1, profile_to=profile_file)
                result.extra["nginx_errors"] = site.errors() - errors
                results.append(_logged(result, 0))
                if profile_file.exists():
                    profile = load_profile(profile_file)
                    profile_meta = {
                        "file": str(profile_file),
                        "samples": profile.samples,
                        "rate": args.profile_rate,
                        "wall_s": result.wall_s,
                        "pages_per_s": result.rate,
                    }
                    profile_text = render_profile(profile, args.profile_top)
    report = render(args, results, manifests, profile_text, profile_meta, versions(scrapy_py))
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": [{**asdict(r), "rate": r.rate} for r in results],
                    "sites": manifests,
                    "profile": profile_meta,
                },
                indent=2,
                default=str,
            )
        )
    log(f"done in {time.monotonic() - started:.0f}s")
    return 0 if all(r.error is None for r in results) else 1


def _logged(result: Result, round_no: int) -> Result:
    result.extra["round"] = round_no
    rss = ", ".join(f"{m:.0f}" for m in result.peak_rss_mb)
    if result.error:
        log(f"{result.label} @ {result.size:,}: FAILED {result.error}")
    else:
        log(
            f"{result.label} @ {result.size:,}: {result.pages:,} pages "
            f"({result.fields_ok:,}/{result.products:,} products' fields ok) in "
            f"{result.span_s:.1f}s = {result.rate:,.0f} pages/s; wall {result.wall_s:.1f}s; "
            f"CPU {result.cpu_s:.1f}s; peak RSS {rss} MB; machine busy {result.machine_busy:.0%}"
            + (
                f"; mean leased {result.extra['mean_leased']}"
                if "mean_leased" in result.extra
                else ""
            )
        )
    return result


# --------------------------------------------------------------------------- report


def _median_rate(results: list[Result]) -> float:
    rates = [r.rate for r in results if r.error is None and r.rate > 0]
    return statistics.median(rates) if rates else float("nan")


def _pick(results: list[Result], crawler: str, size: int, workers: int = 1) -> list[Result]:
    return [
        r
        for r in results
        if r.crawler == crawler
        and r.size == size
        and (crawler != "trawler" or r.workers == workers)
        and r.extra.get("round", 1) > 0  # the profiled run is not a measurement
    ]


def _share(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, float) else "-"


def _ms(value: float, pages: int) -> str:
    return f"{value / pages * 1000:.2f}" if pages and value else "-"


def render(
    args: argparse.Namespace,
    results: list[Result],
    manifests: dict[int, dict[str, Any]],
    profile_text: list[str],
    profile_meta: dict[str, Any],
    libs: dict[str, str],
) -> str:
    m = machine_facts()
    lines = [
        "## Crawl",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {m['nproc']} cores ({m['cpu']}), "
        f"{m['memory']}, Python {m['python']}; PostgreSQL, nginx and other people's work share "
        "the cores (noisy: compare the same-run ratios). Versions: "
        + ", ".join(f"{k} {v}" for k, v in libs.items())
        + ".",
        "",
        f"Command: `.venv/bin/python bench/crawl/run.py --pages {args.pages}"
        + (f" --only {args.only}" if args.only else "")
        + (f" --workers {args.workers}" if args.workers != "1,2" else "")
        + (f" --rounds {args.rounds}" if args.rounds != 1 else "")
        + (f" --host-lease-cap {args.host_lease_cap}" if args.host_lease_cap else "")
        + "`",
        "",
    ]
    for size, site in manifests.items():
        pb = site["product_bytes"]
        lines.append(
            f"- Site of {size:,} pages: {site['products']:,} products "
            f"({pb['min'] / 1024:.1f}-{pb['max'] / 1024:.1f} KB, mean {pb['mean'] / 1024:.1f} KB), "
            f"{site['lists']:,} list pages, {site['categories']} categories, an index; "
            f"{site['bytes'] / 1e6:.0f} MB."
        )
    lines += [
        "",
        "| pages | crawler | pages stored | fields ok | first->last s | pages/s | wall s "
        "| CPU ms/page (crawler) | CPU ms/page (PostgreSQL) | peak RSS MB "
        "| machine busy before / during |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.size:,} | {r.label} | failed: {r.error[:120]} |||||||||")
            continue
        rss = " / ".join(f"{x:.0f}" for x in r.peak_rss_mb)
        if r.idle_rss_mb:
            rss += " (idle " + " / ".join(f"{x:.0f}" for x in r.idle_rss_mb) + ")"
        lines.append(
            f"| {r.size:,} | {r.label} | {r.pages:,} | {r.fields_ok:,}/{r.products:,} | "
            f"{r.span_s:.1f} | **{r.rate:,.0f}** | {r.wall_s:.1f} | {_ms(r.cpu_s, r.pages)} | "
            f"{_ms(r.pg_cpu_s, r.pages) if r.crawler == 'trawler' else '-'} | {rss} | "
            f"{_share(r.extra.get('busy_before'))} / {r.machine_busy:.0%} |"
        )
    lines.append("")
    for r in results:
        notes = []
        if r.extra.get("nginx_errors"):
            notes.append(f"nginx logged {r.extra['nginx_errors']} errors")
        if "mean_leased" in r.extra:
            cap = args.host_lease_cap or args.concurrency
            lease_ms = r.extra["mean_leased"] / r.rate * 1000 if r.rate else 0.0
            notes.append(
                f"{r.extra['mean_leased']:.0f} tasks leased on average (the host's lease cap, "
                f"cluster-wide: {cap}), so a lease lasts ~{lease_ms:.0f} ms (Little's law) "
                f"while the fetch takes {r.extra.get('fetch_ms_p50', 0):.0f} ms p50 / "
                f"{r.extra.get('fetch_ms_p90', 0):.0f} ms p90 as the worker times it; "
                f"{r.extra.get('store_commits', 0):,} storing transactions "
                f"({r.pages / max(1, r.extra.get('store_commits', 1)):.0f} pages each); "
                f"nothing queued in {r.extra['queue_empty_share']:.0%} of the samples"
            )
        tasks = r.extra.get("tasks")
        if isinstance(tasks, dict) and set(tasks) - {"succeeded"}:
            notes.append(f"tasks {tasks}")
        table = r.extra.get("tasks_table")
        if isinstance(table, dict) and table.get("n_tup_upd"):
            hot = table["n_tup_hot_upd"] / table["n_tup_upd"]
            notes.append(
                f"tasks table after the crawl: {table['n_live_tup']:,} live / "
                f"{table['n_dead_tup']:,} dead rows, {hot:.0%} of updates HOT, "
                f"{table['bytes'] / 1e6:.0f} MB, dedupe index "
                f"{table['dedupe_index_bytes'] / 1e6:.1f} MB"
            )
        busy = dict(r.extra.get("pg_active_samples") or {})
        polls = busy.pop("(polls)", 0)
        if polls and busy:
            top = sorted(busy.items(), key=lambda kv: -kv[1])[:5]
            notes.append(
                "PostgreSQL backends busy in "
                + ", ".join(f"{name} {n / polls:.0%}" for name, n in top)
                + " of the polls"
            )
        if notes:
            lines.append(f"- {r.label} @ {r.size:,}: " + "; ".join(notes) + ".")
    for size in manifests:
        bare = _median_rate(_pick(results, "bare", size))
        scrapy = _median_rate(_pick(results, "scrapy", size))
        one = _median_rate(_pick(results, "trawler", size, 1))
        two = _median_rate(_pick(results, "trawler", size, 2))
        parts = []
        if one == one and bare == bare:
            parts.append(
                f"Trawler 1 worker / bare **{one / bare:.2f}x** (target >= 0.50: "
                f"{'met' if one / bare >= 0.5 else 'missed'})"
            )
        if one == one and scrapy == scrapy:
            parts.append(f"Trawler 1 worker / Scrapy **{one / scrapy:.1f}x**")
        if one == one and two == two:
            parts.append(
                f"2 workers / 1 worker **{two / one:.2f}x** (target > 1: "
                f"{'met' if two / one > 1.0 else 'missed'})"
            )
        if bare == bare and scrapy == scrapy:
            parts.append(f"bare / Scrapy {bare / scrapy:.1f}x")
        if parts:
            lines.append(f"- {size:,} pages: " + "; ".join(parts) + ".")
    rss_lines = _rss_lines(results, sorted(manifests))
    lines += rss_lines
    if profile_text:
        busy = profile_meta["samples"] / max(1.0, profile_meta["wall_s"]) / profile_meta["rate"]
        lines += [
            "",
            f"Profile: one worker crawling {max(manifests):,} pages under `py-spy record "
            f"--rate {profile_meta['rate']}` ({profile_meta['pages_per_s']:,.0f} pages/s while "
            f"sampled; {profile_meta['samples']:,} samples in {profile_meta['wall_s']:.0f} s "
            f"= {busy:.0%} of one core busy). Shares of the busy samples:",
            "",
            *profile_text,
        ]
    return "\n".join(lines)


def _rss_lines(results: list[Result], sizes: list[int]) -> list[str]:
    out = []
    worker_peak: dict[int, float] = {}
    scrapy_peak: dict[int, float] = {}
    for size in sizes:
        peaks = [max(r.peak_rss_mb) for r in _pick(results, "trawler", size, 1) if r.peak_rss_mb]
        peaks += [max(r.peak_rss_mb) for r in _pick(results, "trawler", size, 2) if r.peak_rss_mb]
        if peaks:
            worker_peak[size] = max(peaks)
        sp = [max(r.peak_rss_mb) for r in _pick(results, "scrapy", size) if r.peak_rss_mb]
        if sp:
            scrapy_peak[size] = max(sp)
    for size in sizes:
        if size in worker_peak and size in scrapy_peak:
            w, s = worker_peak[size], scrapy_peak[size]
            out.append(
                f"- Peak RSS at {size:,} pages: Trawler worker {w:.0f} MB (highest of all "
                f"worker processes), Scrapy {s:.0f} MB (target worker <= Scrapy: "
                f"{'met' if w <= s else 'missed'})."
            )
    if len(worker_peak) >= 2:
        small, large = min(worker_peak), max(worker_peak)
        growth = worker_peak[large] / worker_peak[small] - 1
        out.append(
            f"- Worker peak RSS {worker_peak[small]:.0f} MB at {small:,} pages, "
            f"{worker_peak[large]:.0f} MB at {large:,} ({growth:+.0%}; target flat, "
            f"taken as within 10%: {'met' if abs(growth) <= 0.10 else 'missed'})."
        )
    return out


# --------------------------------------------------------------------------- entry point


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pages", default="5000,20000", help="site size(s), comma-separated")
    p.add_argument(
        "--only", default=None, help="comma-separated subset of bare,trawler,scrapy (default all)"
    )
    p.add_argument("--workers", default="1,2", help="Trawler worker process counts to run")
    p.add_argument("--concurrency", type=int, default=64, help="fetches in flight per crawler")
    p.add_argument("--rounds", type=int, default=1, help="repeat every crawler; medians compared")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--site-dir", default="/tmp/trawler-bench-crawl-sites")
    p.add_argument("--out-dir", default=None, help="logs, JSONL and profiles (default: a tmp dir)")
    p.add_argument("--keep-output", action="store_true", help="keep the JSONL files")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument(
        "--database-url",
        default=DEFAULT_ADMIN_URL,
        help=f"admin URL of the PostgreSQL server (default {DEFAULT_ADMIN_URL})",
    )
    p.add_argument("--db-name", default=DEFAULT_DB, help="bench database, dropped per run")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the Trawler workers (e.g. TRAWLER_CLAIM_BATCH=200)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        help="before each crawl, wait up to this long for other load to drop below 25%%",
    )
    p.add_argument(
        "--host-lease-cap",
        type=int,
        default=0,
        help="diagnostic: set hosts.max_concurrency (leases per host, cluster-wide) to this "
        "after submitting, above the API's per_host_concurrency limit of 64",
    )
    p.add_argument("--stall", type=float, default=90.0, help="give up after this long idle")
    p.add_argument("--scrapy-python", default=None, help="a Python that has Scrapy")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one extra 1-worker Trawler crawl of the largest site under py-spy",
    )
    p.add_argument("--profile-rate", type=int, default=100)
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--markdown", default=None, help="also write the report here")
    p.add_argument("--json", default=None, help="also write the raw results here")
    return p.parse_args(argv)


def main() -> int:
    args = parse(sys.argv[1:])
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
