"""Queue benchmark: Trawler's claim -> run -> complete machinery beside pgqueuer, then end to end.

    python bench/queue.py [--tasks N] [--database-url URL] [--quick] [--write-docs]

One run does everything on fresh databases of its own (created on the PostgreSQL at
--database-url, default postgresql://postgres@127.0.0.1:5432/test, or on an embedded
pgserver when nothing answers there) and drops them afterwards:

1. Trawler no-op: N tasks spread over a few jobs; AsyncJobExecutor (in a worker process of
   its own, like `trawler worker`) with a handler that returns "succeeded" at once. Timed from
   the moment the queue is opened (cluster un-paused + NOTIFY) to the last job reaching a
   terminal state (its NOTIFY, sent by finish_if_done in the completing transaction).
   A sweep of worker_concurrency x claim_batch, then 2 worker processes on one queue.
2. pgqueuer (the peer) on its own database, schema installed by its CLI (`pgqueuer
   install`), N no-op jobs enqueued in batches and drained by its consumer (the shape of
   its own drain benchmark: 5 QueueManagers on asyncpg connections in one process,
   batch_size=100, mode=drain). Both implementations alternate for --rounds rounds and
   the medians are compared.
3. End to end: a local aiohttp server (its own process) answering a ~200-byte page on any
   path; one scrape job of --e2e-tasks distinct URLs with a one-field CSS extract spec,
   run by 1 and then 2 worker processes with the real ScrapeHandler; pages are counted.

Every measured worker is a separate Python process on uvloop; the parent only waits.
Per-host politeness is lifted (Settings.per_host_concurrency, and hosts.max_concurrency
where the schema has a hosts table): the bench measures the queue, and the end-to-end run
puts every URL on one local host.
"""

# ruff: noqa: E402  (the import path is fixed before the imports)
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# this file is named like the standard library's `queue`: keep its folder off the import
# path (asyncio, anyio and pgqueuer import `queue`), and put the repository root on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
ROOT = _HERE.parent
sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Queue (bench/queue.py)"
JOBS_PER_RUN = 5
DEFAULT_SETTING = (64, 100)  # Settings.worker_concurrency, Settings.claim_batch
HOST_LIMIT = 10_000  # hosts.max_concurrency for the bench's hosts (politeness lifted)
HOSTS = 50
PAGE_HTML = (
    b"<!doctype html><html><head><meta charset='utf-8'><title>Bench page</title></head>"
    b"<body><h1>Item</h1><p class='price'>9.99</p><p>A tiny page for the queue "
    b"benchmark.</p></body></html>"
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- database URLs


def plain_dsn(url: str) -> str:
    """asyncpg / libpq form of a URL (no SQLAlchemy driver suffix)."""
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def with_database(url: str, name: str) -> str:
    head, sep, query = url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}{sep}{query}"


def reachable(url: str) -> bool:
    match = re.match(r"^[a-z+]+://(?:[^@/]*@)?([^:/?]+)(?::(\d+))?/", url)
    if match is None:
        return True  # socket URLs and the like: let asyncpg decide
    try:
        with socket.create_connection((match.group(1), int(match.group(2) or 5432)), timeout=1):
            return True
    except OSError:
        return False


class Server:
    """The PostgreSQL server the bench uses, and the databases it created there."""

    def __init__(self, admin_url: str, embedded: Any = None) -> None:
        self.admin_url = plain_dsn(admin_url)
        self.embedded = embedded
        self.created: list[str] = []
        host = re.match(r"^[a-z+]+://(?:[^@/]*@)?([^:/?]*)", self.admin_url)
        socket_dir = "host=/" in self.admin_url
        # CPU accounting reads the backends' /proc entries: only for a server on this machine
        self.local = (
            embedded is not None
            or socket_dir
            or (host is not None and host.group(1) in ("127.0.0.1", "localhost", "::1", ""))
        )

    @classmethod
    def find(cls, url: str | None, *, embedded: bool = False) -> Server:
        if url is not None:
            return cls(url)
        if not embedded and reachable(DEFAULT_ADMIN_URL):
            return cls(DEFAULT_ADMIN_URL)
        log("starting an embedded PostgreSQL (pgserver)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            pgdata = Path(tempfile.mkdtemp(prefix="trawler-bench-pg-"))
            embedded = pgserver.get_server(pgdata, cleanup_mode="delete")
        return cls(embedded.get_uri(), embedded)

    async def admin(self, *statements: str) -> list[Any]:
        conn = await asyncpg.connect(self.admin_url)
        try:
            out = []
            for statement in statements:
                out.append(await conn.fetch(statement))
            return out
        finally:
            await conn.close()

    async def create(self, name: str) -> str:
        assert re.fullmatch(r"trawler_bench_[a-z0-9_]+", name), name
        await self.admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return with_database(self.admin_url, name)

    async def drop_all(self) -> None:
        for name in self.created:
            with contextlib.suppress(Exception):
                await self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.cleanup()

    async def facts(self) -> dict[str, str]:
        (rows,) = await self.admin("SELECT version() AS v")
        (settings,) = await self.admin(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN "
            "('shared_buffers', 'synchronous_commit', 'max_connections', 'fsync', "
            "'server_version')"
        )
        out = {"version": rows[0]["v"]}
        for row in settings:
            out[row["name"]] = f"{row['setting']}{row['unit'] or ''}"
        return out


# --------------------------------------------------------------------------- child processes


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def child_trawler(args: argparse.Namespace) -> None:
    """One Trawler worker process: start the executor, report ready, run until told to stop."""
    import logging

    from app.config import Settings
    from app.database.connection import ConnectionManager
    from app.services.queue import ClaimedTask, Outcome
    from app.utils.executor import AsyncJobExecutor
    from app.utils.handlers import JobContext, TaskHandler

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    class NoopHandler:
        """The task body does nothing: the executor's own claim/run/complete path only."""

        async def __call__(self, task: ClaimedTask, ctx: JobContext) -> Outcome:
            return Outcome(task.id, task.job_id, "succeeded")

        async def close(self) -> None:
            return None

    settings = Settings(
        database_url=args.db,
        worker_concurrency=args.concurrency,
        claim_batch=args.batch,
        allow_private_networks=True,
        # every e2e URL is on one local host: lift the per-host politeness bound to the
        # global one (a real crawl spreads over many hosts)
        per_host_concurrency=args.concurrency,
        log_level="WARNING",
    )
    db = ConnectionManager(settings, application_name="trawler-bench-worker")
    handler: TaskHandler | None = NoopHandler() if args.handler == "noop" else None
    executor = AsyncJobExecutor(db, settings, handler=handler)
    reader = await stdin_reader()
    await executor.start()
    listener = executor._listener
    if listener is not None:
        await asyncio.wait_for(listener.connected.wait(), 10)
    emit({"event": "ready", "pid": os.getpid()})
    told = asyncio.ensure_future(reader.readline())  # "stop" (or EOF: the parent died)
    stopped = asyncio.ensure_future(executor._stopping.wait())  # a loop crashed
    await asyncio.wait({told, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not told.done():
        emit({"event": "crashed", "error": repr(executor.crashed)})
        await executor.stop(grace=0)
        await db.dispose()
        sys.exit(1)
    stopped.cancel()
    stats = dict(executor.stats.__dict__)
    await executor.stop(grace=2.0)
    await db.dispose()
    emit({"event": "done", "stats": stats})


async def child_pgqueuer(args: argparse.Namespace) -> None:
    """pgqueuer's drain consumer: QueueManagers on asyncpg connections, a no-op entrypoint."""
    from pgqueuer import AsyncpgDriver, PgQueuer
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    reader = await stdin_reader()
    pgqs = []
    for _ in range(args.consumers):
        pgq = PgQueuer(AsyncpgDriver(await asyncpg.connect(plain_dsn(args.db))))

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            return None

        pgqs.append(pgq)
    emit({"event": "ready", "pid": os.getpid()})
    await reader.readline()  # "go"
    started = time.perf_counter()
    await asyncio.gather(
        *(p.run(batch_size=args.batch, mode=QueueExecutionMode.drain) for p in pgqs)
    )
    emit({"event": "done", "elapsed": time.perf_counter() - started})
    await reader.readline()  # "stop": connections stay open until the CPU meter has read them


async def child_http(args: argparse.Namespace) -> None:
    """A local site: the same ~200-byte HTML page on any path, keep-alive."""
    from aiohttp import web

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=PAGE_HTML, content_type="text/html", charset="utf-8")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    port = runner.addresses[0][1]
    emit({"event": "ready", "port": port, "pid": os.getpid()})
    reader = await stdin_reader()
    await reader.readline()
    await runner.cleanup()


class Child:
    """A child process speaking JSON lines on stdout; told what to do on stdin."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.proc = proc
        self.label = label

    @classmethod
    async def spawn(cls, label: str, *argv: str, wrap: list[str] | None = None) -> Child:
        command = [*(wrap or []), sys.executable, str(Path(__file__).resolve()), *argv]
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        return cls(proc, label)

    async def event(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"{self.label} exited ({await self.proc.wait()})")
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and "event" in message:
                    return message

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")

    async def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """Tell it to stop; returns its last event."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send("stop")
        try:
            last = await self.event(timeout)
        except RuntimeError:
            last = {}
        await asyncio.wait_for(self.proc.wait(), timeout)
        return last

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


# --------------------------------------------------------------------------- CPU accounting


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with contextlib.suppress(OSError, ValueError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)
    return 0, 0


class CpuMeter:
    """Where the CPU went during a measured interval.

    The worker processes, their PostgreSQL backends (only when the server runs on this
    machine: their pids are read from pg_stat_activity and /proc) and the machine as a
    whole (other load on the 2 cores shows up as busy time nobody here used).
    """

    def __init__(
        self, dsn: str, worker_pids: list[int], *, local: bool, server_pids: tuple[int, ...] = ()
    ) -> None:
        self.dsn = dsn
        self.worker_pids = worker_pids
        self.server_pids = list(server_pids)  # the local HTTP site (end to end)
        self.local = local
        self.before: dict[str, dict[int, float]] = {}
        self.machine0 = (0, 0)

    async def _backends(self) -> list[int]:
        if not self.local:
            return []
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        return [r["pid"] for r in rows]

    async def _snapshot(self) -> dict[str, dict[int, float]]:
        backends = await self._backends()
        out: dict[str, dict[int, float]] = {"workers": {}, "postgres": {}, "server": {}}
        kinds = (
            ("workers", self.worker_pids),
            ("postgres", backends),
            ("server", self.server_pids),
        )
        for kind, pids in kinds:
            for pid in pids:
                value = _proc_cpu(pid)
                if value is not None:
                    out[kind][pid] = value
        return out

    async def start(self) -> None:
        self.before = await self._snapshot()
        self.machine0 = _machine_ticks()

    async def stop(self) -> dict[str, float]:
        machine1 = _machine_ticks()
        after = await self._snapshot()
        used = {
            kind: sum(v - self.before[kind].get(pid, 0.0) for pid, v in after[kind].items())
            for kind in after
        }
        busy = machine1[0] - self.machine0[0]
        total = machine1[1] - self.machine0[1]
        tick = os.sysconf("SC_CLK_TCK")
        cores = os.cpu_count() or 1
        return {
            "worker_cpu_s": used["workers"],
            "server_cpu_s": used["server"],
            "pg_cpu_s": used["postgres"] if self.local else float("nan"),
            "machine_busy_s": busy / tick / 1.0,
            "machine_capacity_s": total / tick / 1.0 if total else 0.0,
            "cores": float(cores),
        }


# --------------------------------------------------------------------------- Trawler side


@dataclass
class Result:
    name: str
    impl: str
    tasks: int
    seconds: float
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


class TrawlerBench:
    def __init__(self, url: str, *, local: bool) -> None:
        self.url = url  # plain dsn of the Trawler bench database
        self.local = local  # the server runs on this machine (its backends are in /proc)

    async def migrate(self) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        from app.config import Settings
        from app.database.migrations import upgrade_to_head

        engine = create_async_engine(Settings(database_url=self.url).database_url or "")
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    async def reset(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "TRUNCATE jobs, tasks, pages, job_events, workers RESTART IDENTITY CASCADE"
        )
        if await conn.fetchval("SELECT to_regclass('hosts') IS NOT NULL"):
            await conn.execute("TRUNCATE hosts")  # per-host lease counters start at 0
        await conn.execute("UPDATE cluster_state SET paused = true WHERE id = 1")

    async def enqueue(
        self, urls_per_job: list[list[str]], extract: dict[str, Any] | None = None
    ) -> list[uuid.UUID]:
        """Jobs and their tasks, the way a submission writes them (frontier.enqueue)."""
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        from app.config import Settings
        from app.services import frontier

        engine = create_async_engine(Settings(database_url=self.url).database_url or "")
        job_ids = []
        try:
            for urls in urls_per_job:
                job_id = uuid.uuid4()
                spec = {"urls": [], "extract": extract or {}, "options": {"timeout_s": 10}}
                async with engine.begin() as conn:
                    await conn.execute(
                        text(
                            "INSERT INTO jobs (id, tenant, kind, spec) "
                            "VALUES (:id, 'bench', 'scrape', CAST(:spec AS jsonb))"
                        ),
                        {"id": job_id, "spec": orjson.dumps(spec).decode()},
                    )
                    for start in range(0, len(urls), 10_000):
                        rows = frontier.prepare((u, 0) for u in urls[start : start + 10_000])
                        await frontier.enqueue(conn, job_id, rows, priority=0, max_attempts=3)
                        await self._host_rows(conn, sorted({r[2] for r in rows}))
                job_ids.append(job_id)
        finally:
            await engine.dispose()
        return job_ids

    @staticmethod
    async def _host_rows(conn: Any, hosts: list[str]) -> None:
        """Each task host's politeness row, as a submission writes it (when the schema has
        them), with the per-host bound lifted: the bench measures the queue, and the end to
        end run puts every URL on one local host."""
        from sqlalchemy import text

        exists = (await conn.execute(text("SELECT to_regclass('hosts') IS NOT NULL"))).scalar()
        if not exists or not hosts:
            return
        await conn.execute(
            text(
                "INSERT INTO hosts (host, max_concurrency) "
                "SELECT h, :limit FROM unnest(CAST(:hosts AS text[])) AS h "
                "ON CONFLICT (host) DO UPDATE SET max_concurrency = EXCLUDED.max_concurrency"
            ),
            {"hosts": hosts, "limit": HOST_LIMIT},
        )

    async def prepare(
        self,
        n: int,
        jobs: int = JOBS_PER_RUN,
        *,
        base: str | None = None,
        extract: dict[str, Any] | None = None,
    ) -> list[uuid.UUID]:
        conn = await asyncpg.connect(self.url)
        try:
            await self.reset(conn)
        finally:
            await conn.close()
        per_job: list[list[str]] = [[] for _ in range(jobs)]
        for i in range(n):
            url = f"http://h{i % HOSTS}.bench.invalid/item/{i}" if base is None else f"{base}/p/{i}"
            per_job[i % jobs].append(url)
        job_ids = await self.enqueue(per_job, extract)
        conn = await asyncpg.connect(self.url)
        try:
            # every table of the bench's own database: the queue's tables differ between
            # schema revisions (task_queue since 0008), and after the TRUNCATE a table
            # left out has no statistics for the planner
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
        return job_ids

    async def run(
        self,
        job_ids: list[uuid.UUID],
        *,
        processes: int,
        concurrency: int,
        batch: int,
        handler: str = "noop",
        server_pids: tuple[int, ...] = (),
        timeout: float = 300.0,
        wrap: list[str] | None = None,
    ) -> tuple[float, list[dict[str, Any]], dict[str, float]]:
        """Start workers (queue paused), open the queue, time until every job is terminal."""
        from app.services.queue import NOTIFY_TASKS
        from app.services.state import NOTIFY_JOBS

        children = []
        try:
            for k in range(processes):
                children.append(
                    await Child.spawn(
                        f"trawler worker {k}",
                        "_child",
                        "trawler",
                        "--db",
                        self.url,
                        "--concurrency",
                        str(concurrency),
                        "--batch",
                        str(batch),
                        "--handler",
                        handler,
                        wrap=wrap,
                    )
                )
            pids = []
            for child in children:
                event = await child.event(timeout=60)
                assert event["event"] == "ready", event
                pids.append(int(event["pid"]))
            meter = CpuMeter(self.url, pids, local=self.local, server_pids=server_pids)
            await meter.start()
            conn = await asyncpg.connect(self.url)
            try:
                pending = set(job_ids)
                all_done = asyncio.Event()
                terminal = {"completed", "failed", "cancelled"}

                def on_job(_c: Any, _pid: int, _channel: str, payload: str) -> None:
                    job_text, _, status = payload.partition(":")
                    if status in terminal:
                        pending.discard(uuid.UUID(job_text))
                        if not pending:
                            all_done.set()

                await conn.add_listener(NOTIFY_JOBS, on_job)
                started = time.perf_counter()
                async with conn.transaction():
                    await conn.execute("UPDATE cluster_state SET paused = false WHERE id = 1")
                    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_TASKS)
                finished = asyncio.ensure_future(all_done.wait())
                # a worker that reports anything before the end has crashed
                watch = [asyncio.ensure_future(c.event(timeout)) for c in children]
                try:
                    await asyncio.wait(
                        [finished, *watch], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for task in watch:
                        task.cancel()
                    await asyncio.gather(*watch, return_exceptions=True)
                if not finished.done():
                    finished.cancel()
                    why = [
                        t.result()
                        for t in watch
                        if t.done() and not t.cancelled() and t.exception() is None
                    ]
                    raise RuntimeError(f"jobs {pending} not finished: {why or 'timeout'}")
                elapsed = time.perf_counter() - started
            finally:
                await conn.close()
            cpu = await meter.stop()
            stats = [await child.finish() for child in children]
            children = []
            return elapsed, stats, cpu
        finally:
            for child in children:
                child.kill()

    async def verify(self, n: int, job_ids: list[uuid.UUID], *, pages: bool) -> dict[str, int]:
        conn = await asyncpg.connect(self.url)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded, "
                "count(*) AS total FROM tasks"
            )
            jobs = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'completed') AS completed, "
                "sum(succeeded) AS counted, sum(running) + sum(queued) AS open FROM jobs"
            )
            stored = await conn.fetchval("SELECT count(*) FROM pages")
            ok_pages = await conn.fetchval("SELECT count(*) FROM pages WHERE ok")
            fields = await conn.fetchval("SELECT count(*) FROM pages WHERE data->>'title' = 'Item'")
        finally:
            await conn.close()
        facts = {
            "tasks": row["total"],
            "succeeded": row["succeeded"],
            "jobs_completed": jobs["completed"],
            "counted": jobs["counted"],
            "open": jobs["open"],
            "pages": stored,
            "ok_pages": ok_pages,
            "fields": fields,
        }
        problems = []
        if row["succeeded"] != n or row["total"] != n:
            problems.append("tasks")
        if jobs["completed"] != len(job_ids) or jobs["counted"] != n or jobs["open"] != 0:
            problems.append("job counters")
        if pages and (stored != n or ok_pages != n or fields != n):
            problems.append("pages")
        if problems:
            raise RuntimeError(f"verification failed ({', '.join(problems)}): {facts}")
        return facts


# --------------------------------------------------------------------------- pgqueuer side


class PgqBench:
    def __init__(self, url: str, *, local: bool) -> None:
        self.url = url
        self.local = local

    def install(self) -> str:
        """Its own recommended setup: the CLI's `install`."""
        out = subprocess.run(
            [sys.executable, "-m", "pgqueuer", "--pg-dsn", self.url, "install"],
            capture_output=True,
            text=True,
            check=False,
            cwd=str(ROOT),
        )
        if out.returncode != 0:
            raise RuntimeError(f"pgqueuer install failed: {out.stderr[-2000:]}")
        return out.stdout

    async def prepare(self, n: int, batch: int = 10_000) -> None:
        from pgqueuer import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(self.url)
        try:
            queries = Queries(AsyncpgDriver(conn))
            await queries.clear_queue()
            await queries.clear_queue_log()
            await queries.clear_statistics_log()
            for start in range(0, n, batch):
                k = min(batch, n - start)
                await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
        finally:
            await conn.close()
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("VACUUM ANALYZE")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def run(self, n: int, *, consumers: int, batch: int) -> tuple[float, dict[str, float]]:
        child = await Child.spawn(
            "pgqueuer",
            "_child",
            "pgqueuer",
            "--db",
            self.url,
            "--consumers",
            str(consumers),
            "--batch",
            str(batch),
        )
        try:
            ready = await child.event(timeout=60)
            assert ready["event"] == "ready", ready
            meter = CpuMeter(self.url, [int(ready["pid"])], local=self.local)
            await meter.start()
            started = time.perf_counter()
            child.send("go")
            done = await child.event(timeout=600)
            elapsed = time.perf_counter() - started
            cpu = await meter.stop()
            assert done["event"] == "done", done
            child.send("stop")
            await asyncio.wait_for(child.proc.wait(), 30)
        finally:
            child.kill()
        conn = await asyncpg.connect(self.url)
        try:
            left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
            logged = await conn.fetchval(
                "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
            )
        finally:
            await conn.close()
        if left != 0 or logged != n:
            raise RuntimeError(f"pgqueuer left {left} jobs, logged {logged} successes of {n}")
        return elapsed, cpu


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
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@contextlib.asynccontextmanager
async def http_site() -> AsyncIterator[tuple[str, int]]:
    child = await Child.spawn("http", "_child", "http")
    try:
        ready = await child.event(timeout=30)
        yield f"http://127.0.0.1:{ready['port']}", int(ready["pid"])
    finally:
        with contextlib.suppress(Exception):
            await child.finish(timeout=10)
        child.kill()


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def cpu_cells(r: Result) -> str:
    """Table cells: worker CPU, PostgreSQL backend CPU (per task) and machine busy share."""
    cpu = r.cpu
    if not cpu:
        return "| | |"
    per = 1e6 / r.tasks
    pg = cpu["pg_cpu_s"]
    pg_cell = "n/a" if pg != pg else f"{pg * per:.0f}"
    busy = cpu["machine_busy_s"] / cpu["machine_capacity_s"] if cpu["machine_capacity_s"] else 0
    return f"| {cpu['worker_cpu_s'] * per:.0f} | {pg_cell} | {busy:.0%} |"


def cpu_log(r: Result) -> str:
    cells = [c.strip() for c in cpu_cells(r).strip("|").split("|")]
    return f"worker {cells[0]} us/task, postgres {cells[1]} us/task, machine {cells[2]} busy"


async def round_trip_cost(dsn: str, n: int = 500) -> dict[str, float]:
    """What one `SELECT 1` round trip costs here (wall, client CPU): the unit of the
    per-statement overhead that a batch amortises."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(50):
            await conn.fetchval("SELECT 1")
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await conn.fetchval("SELECT 1")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await conn.close()
    return {"wall_us": wall / n * 1e6, "client_cpu_us": cpu / n * 1e6}


@dataclass
class Report:
    pg: dict[str, str]
    rtt: dict[str, float]
    sweep: list[Result]
    pgq_sweep: list[Result]
    rounds: dict[str, list[Result]]
    two: Result
    e2e: list[Result]
    pgq_version: str | None


async def bench(args: argparse.Namespace) -> int:
    if not args.skip_pgqueuer and package_version("pgqueuer") == "not installed":
        print("pgqueuer is not installed: `pip install pgqueuer` (or pass --skip-pgqueuer)")
        return 2
    server = Server.find(args.database_url, embedded=args.embedded)
    tag = f"trawler_bench_{os.getpid()}"
    started = time.monotonic()
    try:
        pg = await server.facts()
        log(f"server: {pg['version'].split(' on ')[0]}; databases {tag}, {tag}_pgq")
        trawler = TrawlerBench(await server.create(tag), local=server.local)
        await trawler.migrate()
        pgq = None
        if not args.skip_pgqueuer:
            pgq = PgqBench(await server.create(f"{tag}_pgq"), local=server.local)
            pgq.install()
        rtt = await round_trip_cost(trawler.url)
        log(f"one SELECT 1 round trip: {rtt['wall_us']:.0f} us wall")
        n = args.tasks

        async def trawler_round(label: str, processes: int, c: int, b: int, k: int = n) -> Result:
            job_ids = await trawler.prepare(k)
            elapsed, stats, cpu = await trawler.run(
                job_ids, processes=processes, concurrency=c, batch=b
            )
            await trawler.verify(k, job_ids, pages=False)
            claims = sum(s.get("stats", {}).get("claim_batches", 0) for s in stats)
            flushes = sum(s.get("stats", {}).get("flushes", 0) for s in stats)
            result = Result(
                label,
                "trawler",
                k,
                elapsed,
                f"{processes} proc, concurrency {c}, claim_batch {b}",
                {
                    "claims": claims,
                    "flushes": flushes,
                    "processes": processes,
                    "concurrency": c,
                    "batch": b,
                },
                cpu,
            )
            log(
                f"trawler {label}: {fmt_rate(result.rate)} tasks/s ({elapsed:.2f}s, {claims} "
                f"claims, {flushes} flushes; {cpu_log(result)})"
            )
            return result

        async def pgq_round(label: str, consumers: int, k: int = n) -> Result:
            assert pgq is not None
            await pgq.prepare(k)
            elapsed, cpu = await pgq.run(k, consumers=consumers, batch=100)
            result = Result(
                label,
                "pgqueuer",
                k,
                elapsed,
                f"{consumers} QueueManager{'s' if consumers > 1 else ''} in 1 proc, "
                "batch_size 100, drain",
                {"consumers": consumers},
                cpu,
            )
            log(
                f"pgqueuer {label}: {fmt_rate(result.rate)} jobs/s ({elapsed:.2f}s; "
                f"{cpu_log(result)})"
            )
            return result

        # 0. warm-up (not reported): catalog caches, shared buffers, the OS page cache
        await trawler_round("warm-up", 1, 500, 500, k=max(1000, n // 5))
        if pgq is not None:
            await pgq_round("warm-up", 2, k=max(1000, n // 5))

        # 1. Trawler: worker_concurrency x claim_batch, one worker process
        combos = [DEFAULT_SETTING] + [
            (c, b) for b in (100, 500) for c in (200, 500, 1000) if (c, b) != DEFAULT_SETTING
        ]
        if args.quick:
            combos = [DEFAULT_SETTING, (500, 500)]
        sweep = [await trawler_round(f"c={c} b={b}", 1, c, b) for c, b in combos]
        best = max(sweep, key=lambda r: r.rate)
        best_c, best_b = best.extra["concurrency"], best.extra["batch"]
        log(f"best Trawler setting: concurrency {best_c}, claim_batch {best_b}")

        # 2. pgqueuer: how many QueueManagers (its drain benchmark runs 5), batch_size 100
        pgq_sweep: list[Result] = []
        pgq_best = None
        if pgq is not None:
            counts = [2] if args.quick else [1, 2, 5]
            pgq_sweep = [await pgq_round(f"{k} consumers", k) for k in counts]
            pgq_best = max(pgq_sweep, key=lambda r: r.rate)
            log(f"best pgqueuer setting: {pgq_best.extra['consumers']} QueueManagers")

        # 3. alternate: Trawler best, Trawler default, pgqueuer best
        rounds: dict[str, list[Result]] = {"best": [], "default": [], "pgqueuer": []}
        for r in range(args.rounds):
            rounds["best"].append(await trawler_round(f"round {r + 1}", 1, best_c, best_b))
            rounds["default"].append(await trawler_round(f"round {r + 1}", 1, *DEFAULT_SETTING))
            if pgq_best is not None:
                consumers = pgq_best.extra["consumers"]
                rounds["pgqueuer"].append(await pgq_round(f"round {r + 1}", consumers))

        # 4. two worker processes on one queue
        two = await trawler_round("2 processes", 2, best_c, best_b)

        # 5. end to end on tiny local pages
        e2e: list[Result] = []
        if args.e2e_tasks:
            extract = {"title": {"css": "h1", "value": "text"}}
            async with http_site() as (base, site_pid):
                for processes in (1, 2):
                    m = args.e2e_tasks
                    job_ids = await trawler.prepare(m, jobs=1, base=base, extract=extract)
                    elapsed, _stats, cpu = await trawler.run(
                        job_ids,
                        processes=processes,
                        concurrency=args.e2e_concurrency,
                        batch=100,
                        handler="scrape",
                        server_pids=(site_pid,),
                    )
                    facts = await trawler.verify(m, job_ids, pages=True)
                    result = Result(
                        f"e2e {processes} proc",
                        "trawler-e2e",
                        m,
                        elapsed,
                        f"{processes} proc, concurrency {args.e2e_concurrency}, claim_batch 100",
                        {"pages": facts["pages"], "processes": processes},
                        cpu,
                    )
                    log(
                        f"e2e {processes} process(es): {fmt_rate(result.rate)} pages/s "
                        f"({elapsed:.2f}s, {facts['pages']} pages stored; {cpu_log(result)}; "
                        f"local site {cpu['server_cpu_s'] / m * 1e6:.0f} us/page)"
                    )
                    e2e.append(result)

        report = Report(
            pg,
            rtt,
            sweep,
            pgq_sweep,
            rounds,
            two,
            e2e,
            package_version("pgqueuer") if pgq is not None else None,
        )
        text = render(args, report)
        print(text)
        if args.json:
            everything = [*sweep, *pgq_sweep, *[r for rs in rounds.values() for r in rs], two, *e2e]
            Path(args.json).write_text(
                json.dumps([{**r.__dict__, "rate": r.rate} for r in everything], indent=2)
            )
        if args.write_docs:
            write_section(text)
            log(f"wrote the section to {DOCS}")
        log(f"done in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        await server.drop_all()
        server.close()


def _median(results: list[Result]) -> float:
    return statistics.median(r.rate for r in results) if results else float("nan")


def render(args: argparse.Namespace, rep: Report) -> str:
    m = machine_facts()
    pg = rep.pg
    command = f"python bench/queue.py --tasks {args.tasks}"
    if args.e2e_tasks != 20_000:
        command += f" --e2e-tasks {args.e2e_tasks}"
    if args.rounds != 3:
        command += f" --rounds {args.rounds}"
    if args.quick:
        command += " --quick"
    lines = [
        SECTION,
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']}, {m['os']}, "
        f"Python {m['python']}, uvloop; PostgreSQL {pg.get('server_version', '?')} on the "
        f"same machine (shared_buffers {pg.get('shared_buffers')}, synchronous_commit "
        f"{pg.get('synchronous_commit')}, fsync {pg.get('fsync')}); "
        f"pgqueuer {rep.pgq_version or 'skipped'}. One `SELECT 1` round trip costs "
        f"{rep.rtt['wall_us']:.0f} us here ({rep.rtt['client_cpu_us']:.0f} us of client CPU).",
        "",
        f"Command: `{command}` ({args.tasks:,} no-op tasks per run, 5 jobs; "
        f"{args.e2e_tasks:,} pages end to end).",
        "",
        "| run | implementation | setting | tasks | seconds | tasks/s "
        "| worker CPU us/task | PostgreSQL CPU us/task | machine busy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(run: str, impl: str, r: Result) -> str:
        return (
            f"| {run} | {impl} | {r.detail} | {r.tasks:,} | {r.seconds:.2f} | "
            f"{fmt_rate(r.rate)} {cpu_cells(r)}"
        )

    best = max(rep.sweep, key=lambda r: r.rate)
    for r in rep.sweep:
        is_default = (r.extra["concurrency"], r.extra["batch"]) == DEFAULT_SETTING
        mark = " (default)" if is_default else ""
        mark += " (best)" if r is best else ""
        lines.append(row(f"no-op sweep{mark}", "Trawler", r))
    pgq_best = max(rep.pgq_sweep, key=lambda r: r.rate) if rep.pgq_sweep else None
    for r in rep.pgq_sweep:
        lines.append(row(f"no-op sweep{' (best)' if r is pgq_best else ''}", "pgqueuer", r))
    for r in range(len(rep.rounds["best"])):
        lines.append(row(f"no-op round {r + 1}", "Trawler (best)", rep.rounds["best"][r]))
        lines.append(row(f"no-op round {r + 1}", "Trawler (default)", rep.rounds["default"][r]))
        if rep.rounds["pgqueuer"]:
            lines.append(row(f"no-op round {r + 1}", "pgqueuer", rep.rounds["pgqueuer"][r]))
    lines.append(row("no-op, 2 worker processes", "Trawler", rep.two))
    for r in rep.e2e:
        lines.append(row("end to end, pages stored", "Trawler + ScrapeHandler", r))

    tr_best, tr_default = _median(rep.rounds["best"]), _median(rep.rounds["default"])
    k = len(rep.rounds["best"])
    lines += [
        "",
        f"- Medians of {k} alternating rounds: Trawler best setting "
        f"**{fmt_rate(tr_best)} tasks/s**, default setting (worker_concurrency "
        f"{DEFAULT_SETTING[0]}, claim_batch {DEFAULT_SETTING[1]}) {fmt_rate(tr_default)} tasks/s"
        f" (target >= 10,000: best {'met' if tr_best >= 10_000 else 'missed'}, default "
        f"{'met' if tr_default >= 10_000 else 'missed'}).",
    ]
    if rep.rounds["pgqueuer"]:
        pq = _median(rep.rounds["pgqueuer"])
        lines.append(
            f"- pgqueuer median {fmt_rate(pq)} jobs/s. Ratio Trawler/pgqueuer: best "
            f"**{tr_best / pq:.2f}x**, default {tr_default / pq:.2f}x (target >= 1.3x: "
            f"{'met' if tr_best / pq >= 1.3 else 'missed'})."
        )
    lines.append(
        f"- 2 worker processes: {fmt_rate(rep.two.rate)} tasks/s "
        f"({rep.two.rate / tr_best:.2f}x the one-process median)."
    )
    if len(rep.e2e) == 2:
        lines.append(
            f"- End to end (real fetch + extract + pages stored): {fmt_rate(rep.e2e[0].rate)} "
            f"pages/s with 1 worker process, {fmt_rate(rep.e2e[1].rate)} with 2 "
            f"({rep.e2e[1].rate / rep.e2e[0].rate:.2f}x)."
        )
    lines += ["", *limits(rep), "", NOTES_TEXT.strip(), ""]
    return "\n".join(lines)


def _cpu_median(results: list[Result], key: str) -> float:
    values = [r.cpu[key] / r.tasks * 1e6 for r in results if r.cpu and r.cpu[key] == r.cpu[key]]
    return statistics.median(values) if values else float("nan")


def limits(rep: Report) -> list[str]:
    """What bounds each number, with this run's figures (the profile findings are static)."""
    best, default = rep.rounds["best"], rep.rounds["default"]
    bw, bp = _cpu_median(best, "worker_cpu_s"), _cpu_median(best, "pg_cpu_s")
    dw, dp = _cpu_median(default, "worker_cpu_s"), _cpu_median(default, "pg_cpu_s")
    out = [
        "What limits throughput:",
        "",
        f"- **CPU, shared by everything on 2 cores.** With the best setting a task costs "
        f"{bw:.0f} us in the worker and {bp:.0f} us in its PostgreSQL backends (medians), "
        f"so the two cores cap one queue near {round(2e6 / (bw + bp), -2):,.0f} tasks/s with "
        'nothing else running; the "machine busy" column shows how much other load shared '
        "them. A second worker process brings no extra core: on an idle machine it gains "
        "little (worker and PostgreSQL already share both cores); under other load it mostly "
        "wins a larger share of the CPU. It pays off when PostgreSQL has cores of its own.",
        f"- **PostgreSQL does {bp / (bw + bp):.0%} of that work.** Per task: the claim "
        "updates its `task_queue` row (a non-HOT update: `lease_owner` is in the partial "
        "indexes' predicates; the primary key and `ix_task_queue_leased` get an entry); "
        "the completion deletes that row and "
        "writes the outcome into `tasks` in unindexed columns (a HOT update when the page "
        "has room: the fillfactor of 80 leaves it for about a fifth of a page's rows in one "
        "transaction; the bench completes neighbouring rows together, so part of them are "
        "not HOT). Before migration 0008 both steps updated `tasks` itself, with `status` "
        "indexed: 8 index entries per task instead of 2 (plus those of the tasks update "
        "that found no room in its page).",
        f"- **Per-statement cost decides the default.** A round trip costs "
        f"{rep.rtt['wall_us']:.0f} us here, and the claim is re-planned on every execution "
        "(its LIMIT is a parameter, so PostgreSQL keeps custom plans, ~0.5 ms each); with "
        f"claim_batch 100 that overhead is paid per 100 tasks: {dw:.0f} + {dp:.0f} us/task "
        f"against {bw:.0f} + {bp:.0f} with claim_batch 500. The writer group-commits the "
        "outcomes of several claims per `complete` (one flush interval).",
    ]
    if rep.rounds["pgqueuer"]:
        pw = _cpu_median(rep.rounds["pgqueuer"], "worker_cpu_s")
        pp = _cpu_median(rep.rounds["pgqueuer"], "pg_cpu_s")
        out.append(
            f"- **pgqueuer** spends {pw:.0f} us/job in its Python process and {pp:.0f} us/job "
            "in PostgreSQL (claim: UPDATE to picked; completion, buffered: DELETE plus an "
            "INSERT into its log table)."
        )
    if len(rep.e2e) == 2:
        one = rep.e2e[0]
        site = one.cpu.get("server_cpu_s", 0.0) / one.tasks * 1e6 if one.cpu else 0.0
        out.append(
            f"- **End to end** the worker spends {one.cpu['worker_cpu_s'] / one.tasks * 1e6:.0f} "
            "us per page (profiled: the aiohttp client ~55%, selectolax parse + CSS ~19%, "
            f"claim + complete ~5%) and the local site {site:.0f} us. One worker process is "
            "bound by its one event loop (one core at most); two can use both cores, shared "
            "with the site and PostgreSQL."
        )
    return out


NOTES_TEXT = """
How it is measured: tasks are enqueued with `frontier.enqueue` into jobs whose queue is
paused (`cluster_state.paused`); the worker processes start and connect; the clock starts
when the bench un-pauses and NOTIFYs, and stops when the last job's terminal-status NOTIFY
(sent by `finish_if_done` in the completing transaction) arrives. pgqueuer's clock runs
from "go" to the return of its drain-mode `run()`. Both queues are `VACUUM ANALYZE`d and
CHECKPOINTed before each run, and one unreported warm-up run of each goes first; every
run is verified (all tasks succeeded and job counters agree; end to end: one `pages` row
per URL with the extracted field). CPU columns: user+system time of the worker
process(es) and of their PostgreSQL backends over the timed interval, per task; "machine
busy" is the share of both cores busy with anything (other work on the box included).
Other load on a shared machine moves the absolute rates from run to run (and within a
run): compare the same-run ratios and the CPU per task.
"""


def write_section(report: str) -> None:
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    body = report.strip() + "\n"
    start = text.find(SECTION)
    if start == -1:
        text = text.rstrip() + "\n\n" + body
    else:
        after = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + ("\n" + text[after + 1 :] if after != -1 else "")
    DOCS.write_text(text)


# --------------------------------------------------------------------------- entry point


def parse(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] == "_child":
        p = argparse.ArgumentParser(prog="bench/queue.py _child")
        p.add_argument("kind", choices=["trawler", "pgqueuer", "http"])
        p.add_argument("--db")
        p.add_argument("--concurrency", type=int, default=64)
        p.add_argument("--batch", type=int, default=100)
        p.add_argument("--handler", choices=["noop", "scrape"], default="noop")
        p.add_argument("--consumers", type=int, default=5)
        ns = p.parse_args(argv[1:])
        ns.child = True
        return ns
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=50_000, help="no-op tasks per round")
    p.add_argument(
        "--database-url",
        default=None,
        help=f"admin URL of the server (default {DEFAULT_ADMIN_URL}, else embedded)",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating Trawler/pgqueuer rounds")
    p.add_argument("--e2e-tasks", type=int, default=20_000, help="end-to-end URLs (0: skip)")
    p.add_argument("--e2e-concurrency", type=int, default=200)
    p.add_argument(
        "--pgq-consumers",
        type=int,
        default=5,
        help="pgqueuer QueueManagers (its drain benchmark's default is 5)",
    )
    p.add_argument(
        "--embedded", action="store_true", help="use an embedded pgserver even if 5432 answers"
    )
    p.add_argument("--skip-pgqueuer", action="store_true")
    p.add_argument("--quick", action="store_true", help="a 2-setting sweep only")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help=f"add/replace the '{SECTION}' section of docs/BENCHMARKS.md",
    )
    ns = p.parse_args(argv)
    ns.child = False
    return ns


def main() -> int:
    args = parse(sys.argv[1:])
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    if args.child:
        target = {"trawler": child_trawler, "pgqueuer": child_pgqueuer, "http": child_http}
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(target[args.kind](args))
        return 0
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
