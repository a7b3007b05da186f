"""API benchmark: Trawler's hot routes beside a plain FastAPI + SQLAlchemy ORM app, one run.

    python bench/api.py [--duration 17] [--warmup 3] [--rounds 2] [--jobs 3000] [--no-docs]

One run, on databases of its own (``trawler_bench_api_<pid>`` on --database-url, default
postgresql://postgres@127.0.0.1:5432/postgres; dropped afterwards):

1. migrates with upgrade_to_head, creates an API key (apikeys.create_key) and --jobs scrape
   jobs through jobs.submit_job;
2. starts two servers, each its own uvicorn process (1 worker, uvloop, httptools, no access
   log): Trawler's create_app() without the executor hook (what `trawler serve --no-worker`
   serves) and the REFERENCE, a plain FastAPI app whose GET /jobs/{id} does
   ``await session.get(Job, id)`` on an AsyncSession and returns a pydantic model, with
   the same pool settings (pool_size, max_overflow, timeouts, pool_pre_ping=True);
3. drives each with wrk (-c64, --latency; Lua scripts rotate over the job ids, POST a JSON
   body with the Authorization header), a warm-up first, then --rounds rounds that alternate
   the order (reference, GET, POST; then POST, GET, reference; ...);
4. prints a Markdown table and rewrites the "## API (bench/api.py)" section of
   docs/BENCHMARKS.md (other sections are left as they are).

Cases: (a) GET /api/v1/jobs/{id} with a Bearer key vs the reference primary-key read of the
same rows; (b) POST /api/v1/scrape with one URL (a new path each time) vs the same reference.
Targets (issue 3): (a) >= 1.5x the reference, (b) >= 1.0x, both with p99 < 100 ms.

The servers are started with `python -m uvicorn bench.api:trawler_app --factory` and
`bench.api:reference_app`: the two factories below, configured through the environment.
"""

# ruff: noqa: E402  (the import path is fixed before the imports)
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# bench/queue.py is named like the standard library's `queue`: keep this folder off the
# import path when run as a script, and put the repository root on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
ROOT = _HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import version as dist_version
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## API (bench/api.py)"
TENANT = "bench"
TARGET_GET = 1.5
TARGET_POST = 1.0
TARGET_P99_MS = 100.0
REF_DB_ENV = "BENCH_REFERENCE_DATABASE_URL"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the two apps
# Imported by the uvicorn child processes (`bench.api:trawler_app`, `bench.api:reference_app`).


def trawler_app() -> Any:
    """Trawler's API as `trawler serve --no-worker` builds it: no executor hook, no
    migration at start (the bench migrated); settings from TRAWLER_* variables."""
    from app.config import get_settings
    from app.logging import configure_logging
    from app.main import create_app

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings, migrate=False, hooks=[])


class ProgressOut(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str
    status: str
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressOut
    error: str | None
    spec: dict[str, Any]


_reference_sessions: async_sessionmaker[AsyncSession] | None = None


async def reference_session() -> AsyncIterator[AsyncSession]:
    assert _reference_sessions is not None
    async with _reference_sessions() as session:
        yield session


def reference_app() -> FastAPI:
    """The reference: plain FastAPI + SQLAlchemy ORM primary-key read, nothing clever.

    Same pool settings as Trawler's ConnectionManager (from the same Settings), stock
    `pool_pre_ping=True`, one AsyncSession per request from a dependency, the ORM `Job`
    loaded with `session.get` and returned as a pydantic model via response_model.
    """
    global _reference_sessions
    from app.config import Settings
    from app.database.models import Job

    settings = Settings(database_url=os.environ[REF_DB_ENV])
    assert settings.database_url is not None
    engine = create_async_engine(
        settings.database_url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=True,
        connect_args={
            "timeout": settings.db_connect_timeout,
            "command_timeout": settings.db_command_timeout,
            "server_settings": {"application_name": "bench-reference"},
        },
    )
    _reference_sessions = async_sessionmaker(engine, expire_on_commit=False)
    connects = [0]

    @event.listens_for(engine.sync_engine, "connect")
    def _count_connect(*_: Any) -> None:
        connects[0] += 1

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(title="reference", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        # for the report only: connections opened since start (the bench's own counter)
        return {"connects": connects[0]}

    @app.get("/jobs/{job_id}", response_model=JobOut)
    async def read_job(job_id: uuid.UUID, session: ReferenceSessionDep) -> JobOut:
        job = await session.get(Job, job_id)
        if job is None:
            raise HTTPException(status_code=404, detail="job not found")
        return JobOut(
            id=job.id,
            kind=job.kind.value,
            status=job.status.value,
            priority=job.priority,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            progress=ProgressOut(
                total=job.total,
                queued=job.queued,
                running=job.running,
                succeeded=job.succeeded,
                failed=job.failed,
            ),
            error=job.error,
            spec=job.spec,
        )

    return app


ReferenceSessionDep = Annotated[AsyncSession, Depends(reference_session)]


# --------------------------------------------------------------------------- databases


def plain_dsn(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def with_database(url: str, name: str) -> str:
    head, sep, query = url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}{sep}{query}"


class Databases:
    """The databases this run created on the server (and only those are dropped)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = plain_dsn(admin_url)
        self.created: list[str] = []

    async def admin(self, statement: str) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url)
        try:
            return list(await conn.fetch(statement))
        finally:
            await conn.close()

    async def create(self, name: str) -> str:
        assert re.fullmatch(r"trawler_bench_api_[0-9]+", name), name
        await self.admin(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return with_database(self.admin_url, name)

    async def drop_all(self) -> None:
        for name in self.created:
            try:
                await self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as error:  # report, never hide a leftover database
                log(f"could not drop {name}: {error}")
        self.created.clear()

    async def facts(self) -> dict[str, str]:
        rows = await self.admin(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN "
            "('shared_buffers', 'synchronous_commit', 'max_connections', 'server_version')"
        )
        return {r["name"]: f"{r['setting']}{'' if r['unit'] is None else r['unit']}" for r in rows}


async def prepare_data(url: str, n_jobs: int) -> tuple[str, list[str]]:
    """Migrate, create a key and n_jobs one-URL scrape jobs; returns (key, job ids)."""
    from app.api.schemas import ScrapeCreate
    from app.config import Settings
    from app.database.connection import ConnectionManager
    from app.database.migrations import upgrade_to_head
    from app.services import apikeys, jobs

    db = ConnectionManager(Settings(database_url=url), application_name="bench-setup")
    try:
        await upgrade_to_head(db.engine)
        async with db.session() as session:
            _, key = await apikeys.create_key(session, "bench", TENANT)
        ids: list[str] = []

        async def submit(start: int, stop: int) -> None:
            async with db.session() as session:
                for i in range(start, stop):
                    request = ScrapeCreate.model_validate(
                        {
                            "urls": [f"http://example.com/seed/{i}"],
                            "extract": {"title": {"css": "h1"}},
                        }
                    )
                    job, _ = await jobs.submit_job(session, TENANT, request)
                    ids.append(str(job.id))

        step = max(1, n_jobs // 4)
        await asyncio.gather(*(submit(s, min(n_jobs, s + step)) for s in range(0, n_jobs, step)))
        async with db.connect() as conn:
            from sqlalchemy import text

            await conn.execute(text("ANALYZE"))
        return key, ids
    finally:
        await db.dispose()


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    target: str
    port: int
    env: dict[str, str]
    health: str
    proc: subprocess.Popen[bytes] | None = None
    log_dir: Path = field(default_factory=Path)

    def start(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        cmd = [
            sys.executable, "-m", "uvicorn", self.target, "--factory",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning", "--app-dir", str(ROOT),
        ]  # fmt: skip
        logfile = open(log_dir / f"{self.name}.log", "wb")  # noqa: SIM115 (lives with the child)
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                output = (self.log_dir / f"{self.name}.log").read_text(errors="replace")
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{output[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}{self.health}", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {timeout}s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until the machine is idle between our cases: other load on
    these 2 cores (another benchmark) would distort the comparison. Returns the busy share
    seen last."""
    deadline = time.monotonic() + max_wait
    warned = False
    while True:
        busy0, total0 = machine_busy()
        time.sleep(1.0)
        busy1, total1 = machine_busy()
        share = (busy1 - busy0) / max(1.0, total1 - total0)
        if share < threshold or time.monotonic() >= deadline:
            if share >= threshold:
                log(f"  machine still {share:.0%} busy with other work: measuring anyway")
            return share
        if not warned:
            log(f"  machine {share:.0%} busy with other work: waiting up to {max_wait:.0f}s")
            warned = True


def cpu_seconds(pid: int) -> float:
    """user+system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """user+system CPU time of every running `postgres` process on this machine (the
    local server's backends; one that exits meanwhile takes its time with it)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            total += cpu_seconds(int(proc.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
    return total


def _cpu_line() -> list[int]:
    """The machine's CPU jiffies, from /proc/stat: user nice system idle iowait irq softirq
    steal (guest time is counted in user already)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (steal counts as busy: not ours to use)."""
    values = _cpu_line()
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def machine_steal() -> tuple[float, float]:
    """(steal, total) jiffies: time a virtual machine's CPUs were ready to run but the
    hypervisor ran someone else."""
    values = _cpu_line()
    return float(values[7]), float(sum(values))


# --------------------------------------------------------------------------- wrk

# done() prints one JSON line wrk's own report lacks: exact percentiles and error counts
_LUA_DONE = """
done = function(summary, latency, requests)
  io.write(string.format(
    '\\nBENCH_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, '
    .. '"read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, '
    .. '"p99_us": %d, "max_us": %d, "mean_us": %f}\\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def lua_get(path_prefix: str, ids: list[str], token: str | None) -> str:
    table = ",".join(f'"{i}"' for i in ids)
    auth = f'wrk.headers["Authorization"] = "Bearer {token}"\n' if token else ""
    return (
        f"{auth}local ids = {{{table}}}\nlocal n = #ids\nlocal i = 0\n"
        "setup = function(thread) thread:set('offset', math.random(n)) end\n"
        "request = function()\n"
        "  i = i + 1\n"
        f'  return wrk.format("GET", "{path_prefix}" .. ids[(i + (offset or 0)) % n + 1])\n'
        "end\n" + _LUA_DONE
    )


def lua_post(token: str, tag: str) -> str:
    script = """
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer TOKEN"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
local i = 0
setup = function(thread) counter = counter + 1; thread:set("tid", counter) end
request = function()
  i = i + 1
  local body = '{"urls": ["http://example.com/TAG/' .. (tid or 0) .. '/' .. i .. '"]}'
  return wrk.format("POST", "/api/v1/scrape", nil, body)
end
"""
    return script.replace("TOKEN", token).replace("TAG", tag) + _LUA_DONE


@dataclass
class Run:
    case: str
    app: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu: float  # fraction of one core used by the uvicorn process
    cpu_us: float  # uvicorn process CPU per request, microseconds
    machine_cpu: float  # fraction of all cores busy
    steal: float  # fraction of all cores' time the hypervisor gave to other guests
    db_cpu_us: float  # PostgreSQL processes' CPU per request, microseconds
    background: float  # fraction of all cores busy just before (other work)


@dataclass
class Bench:
    args: argparse.Namespace
    scripts: dict[str, Path] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)

    def wrk(self, server: Server, script: Path, seconds: float) -> dict[str, Any]:
        nice = ["nice", "-n", str(self.args.wrk_nice)] if self.args.wrk_nice else []
        cmd = [
            *nice, "wrk", f"-t{self.args.threads}", f"-c{self.args.connections}",
            f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s",
            "-s", str(script), server.url,
        ]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        match = re.search(r"BENCH_JSON (\{.*\})", out)
        if match is None:
            raise RuntimeError(f"no result from wrk:\n{out}")
        result: dict[str, Any] = json.loads(match.group(1))
        return result

    def measure(self, case: str, app: str, server: Server, script: str, rnd: int) -> Run:
        background = wait_quiet(self.args.wait_quiet)
        spy = None
        if self.args.profile is not None and rnd == 1:
            # py-spy takes CPU of its own: numbers from a profiled run are not for the table
            out = self.args.profile / f"{case}.txt"
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--format", "raw",
                 "--duration", str(max(1, round(self.args.duration))), "--rate", "200",
                 "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        cpu0, (busy0, total0) = cpu_seconds(server.pid), machine_busy()
        steal0, stotal0 = machine_steal()
        db0 = postgres_cpu_seconds()
        t0 = time.monotonic()
        r = self.wrk(server, self.scripts[script], self.args.duration)
        wall = time.monotonic() - t0
        if spy is not None:
            spy.wait()
        cpu1, (busy1, total1) = cpu_seconds(server.pid), machine_busy()
        steal1, stotal1 = machine_steal()
        db1 = postgres_cpu_seconds()
        errors = r["non2xx"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
        run = Run(
            case=case,
            app=app,
            round=rnd,
            rps=r["requests"] / (r["duration_us"] / 1e6),
            p50_ms=r["p50_us"] / 1000,
            p99_ms=r["p99_us"] / 1000,
            max_ms=r["max_us"] / 1000,
            errors=errors,
            server_cpu=(cpu1 - cpu0) / wall,
            cpu_us=(cpu1 - cpu0) / max(1, r["requests"]) * 1e6,
            machine_cpu=(busy1 - busy0) / max(1.0, total1 - total0),
            steal=(steal1 - steal0) / max(1.0, stotal1 - stotal0),
            db_cpu_us=(db1 - db0) / max(1, r["requests"]) * 1e6,
            background=background,
        )
        log(
            f"round {rnd} {case:>4} {app:<9} {run.rps:8.0f} req/s  p50 {run.p50_ms:6.1f} ms  "
            f"p99 {run.p99_ms:6.1f} ms  errors {errors}  server CPU {run.server_cpu:.0%} "
            f"({run.cpu_us:.0f} us/req)  PostgreSQL {run.db_cpu_us:.0f} us/req"
            f"  machine {run.machine_cpu:.0%} (stolen {run.steal:.0%})"
        )
        if errors:
            log(f"  !! {errors} failed requests ({r})")
        self.runs.append(run)
        return run


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def summarise(runs: list[Run]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key in ("ref", "get", "post"):
        mine = [r for r in runs if r.case == key]
        out[key] = {
            "rps": mean([r.rps for r in mine]),
            "p50": mean([r.p50_ms for r in mine]),
            "p99": max((r.p99_ms for r in mine), default=0.0),
            "cpu": mean([r.server_cpu for r in mine]),
            "cpu_us": mean([r.cpu_us for r in mine]),
            "db_us": mean([r.db_cpu_us for r in mine]),
            "machine": mean([r.machine_cpu for r in mine]),
            "errors": float(sum(r.errors for r in mine)),
        }
    return out


CASE_LABEL = {
    "ref": "reference: FastAPI + SQLAlchemy ORM `session.get(Job, id)`",
    "get": "Trawler `GET /api/v1/jobs/{id}` (Bearer key)",
    "post": "Trawler `POST /api/v1/scrape` (1 URL, Bearer key)",
}


def table(runs: list[Run], s: dict[str, dict[str, float]]) -> str:
    ref = s["ref"]["rps"] or 1.0
    lines = [
        "| case | req/s (mean) | per round | x reference | p50 ms | p99 ms (worst) | "
        "p99 per round | server CPU | CPU us/req | PostgreSQL CPU us/req | errors |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for key in ("ref", "get", "post"):
        mine = [r for r in runs if r.case == key]
        ordered = sorted(mine, key=lambda r: r.round)
        per_round = " / ".join(f"{r.rps:,.0f}" for r in ordered)
        p99s = " / ".join(f"{r.p99_ms:.1f}" for r in ordered)
        lines.append(
            f"| {CASE_LABEL[key]} | {s[key]['rps']:,.0f} | {per_round} | "
            f"{s[key]['rps'] / ref:.2f}x | {s[key]['p50']:.1f} | {s[key]['p99']:.1f} | "
            f"{p99s} | {s[key]['cpu']:.0%} | {s[key]['cpu_us']:,.0f} | "
            f"{s[key]['db_us']:,.0f} | {int(s[key]['errors'])} |"
        )
    return "\n".join(lines)


def verdicts(s: dict[str, dict[str, float]]) -> list[str]:
    ref = s["ref"]["rps"] or 1.0
    out = []
    for key, target in (("get", TARGET_GET), ("post", TARGET_POST)):
        ratio = s[key]["rps"] / ref
        p99 = s[key]["p99"]
        ok = ratio >= target and p99 < TARGET_P99_MS and not s[key]["errors"]
        name = "(a) GET job" if key == "get" else "(b) POST scrape"
        misses = []
        if ratio < target:
            misses.append(f"throughput {1 - ratio / target:.0%} short")
        if p99 >= TARGET_P99_MS:
            misses.append(f"p99 {p99 / TARGET_P99_MS - 1:.0%} over")
        verdict = "met" if ok else "MISSED: " + ", ".join(misses or ["errors"])
        out.append(
            f"- {name}: {ratio:.2f}x the reference (target ≥ {target}x), p99 {p99:.1f} ms "
            f"(target < {TARGET_P99_MS:.0f} ms): **{verdict}**"
        )
    return out


def write_docs(section: str) -> None:
    """Replace (or append) only this benchmark's section; other sections are left alone."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    new = section.rstrip("\n").splitlines()
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", *new]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        lines = lines[:start] + new + ([""] if tail else []) + tail
    DOCS.write_text("\n".join(lines) + "\n")


def machine_facts(pg: dict[str, str]) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    wrk_version = (wrk_version.split("[")[0].strip() or "wrk").replace("wrk ", "wrk ")
    libs = ", ".join(
        f"{name} {dist_version(name)}"
        for name in ("fastapi", "starlette", "pydantic", "uvicorn", "sqlalchemy", "asyncpg")
    )
    return (
        f"{os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}; "
        f"PostgreSQL {pg.get('server_version', '?')} on 127.0.0.1 (shared_buffers "
        f"{pg.get('shared_buffers', '?')}, synchronous_commit {pg.get('synchronous_commit', '?')})"
        f", same machine; Python {platform.python_version()}, {libs}; {wrk_version}"
    )


async def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        log("wrk is not installed: apt-get update && apt-get install -y wrk")
        return 2
    dbs = Databases(args.database_url)
    name = f"trawler_bench_api_{os.getpid()}"
    servers: list[Server] = []
    tmp = Path(tempfile.mkdtemp(prefix="trawler-bench-api-"))
    try:
        url = await dbs.create(name)
        sa_url = "postgresql+asyncpg://" + url.split("://", 1)[1]
        pg = await dbs.facts()
        t0 = time.monotonic()
        key, ids = await prepare_data(sa_url, args.jobs)
        log(f"database {name}: migrated, key created, {len(ids)} jobs in "
            f"{time.monotonic() - t0:.1f}s")  # fmt: skip

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("TRAWLER_")}
        trawler = Server(
            "trawler",
            "bench.api:trawler_app",
            free_port(),
            {
                **base_env,
                "TRAWLER_DATABASE_URL": sa_url,
                "TRAWLER_LOG_LEVEL": "WARNING",
                # one tenant submits thousands of jobs a second here: per-tenant limits off
                "TRAWLER_TENANT_SUBMIT_RATE": "0",
                "TRAWLER_TENANT_MAX_ACTIVE_JOBS": "0",
            },
            "/health/live",
        )
        reference = Server(
            "reference",
            "bench.api:reference_app",
            free_port(),
            {**base_env, REF_DB_ENV: sa_url},
            "/health",
        )
        servers = [trawler, reference]
        for server in servers:
            server.start(tmp)
        for server in servers:
            server.wait_ready()
        log(f"trawler pid {trawler.pid} on :{trawler.port}, reference pid {reference.pid} "
            f"on :{reference.port}")  # fmt: skip

        bench = Bench(args)
        for script, body in {
            "get": lua_get("/api/v1/jobs/", ids, key),
            "ref": lua_get("/jobs/", ids, None),
            "post": lua_post(key, f"p{os.getpid()}"),
        }.items():
            bench.scripts[script] = tmp / f"{script}.lua"
            bench.scripts[script].write_text(body)

        # both apps hit once for correctness before any load
        for server, path, auth in (
            (trawler, f"/api/v1/jobs/{ids[0]}", key),
            (reference, f"/jobs/{ids[0]}", None),
        ):
            request = urllib.request.Request(server.url + path)
            if auth:
                request.add_header("Authorization", f"Bearer {auth}")
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    assert json.loads(r.read())["id"] == ids[0]
            except urllib.error.HTTPError as error:
                raise RuntimeError(f"{server.name}: {error} {error.read()[:2000]!r}") from None

        cases = {"ref": reference, "get": trawler, "post": trawler}
        apps = {"ref": "reference", "get": "trawler", "post": "trawler"}
        log(f"warm-up {args.warmup:.0f}s per case")
        for case, server in cases.items():
            bench.wrk(server, bench.scripts[case], args.warmup)
        order = ["ref", "get", "post"]
        for rnd in range(1, args.rounds + 1):
            for case in order if rnd % 2 else list(reversed(order)):
                bench.measure(case, apps[case], cases[case], case, rnd)

        pools = {
            "trawler": get_json(trawler.url + "/health")["pool"],
            "reference": get_json(reference.url + "/stats"),
        }
        s = summarise(bench.runs)
        md = table(bench.runs, s)
        ratios = verdicts(s)
        notes = findings(args, bench.runs, s, pools)
        print()
        print(md)
        print()
        print("\n".join(ratios))
        print()
        print(notes)
        if args.docs:
            section = docs_section(args, pg, md, ratios, notes)
            write_docs(section)
            log(f"wrote the '{SECTION}' section of {DOCS.relative_to(ROOT)}")
        failed = any(r.errors for r in bench.runs)
        return 1 if failed else 0
    finally:
        for server in servers:
            server.stop()
        await dbs.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def findings(
    args: argparse.Namespace,
    runs: list[Run],
    s: dict[str, dict[str, float]],
    pools: dict[str, Any],
) -> str:
    """The measured facts behind the table, for the reader who asks what limits it."""
    c = args.connections
    spread = s["get"]["p99"] / max(1e-9, c / max(1.0, s["get"]["rps"]) * 1000)
    lines = [
        f"- Every server ran its one process at {min(s[k]['cpu'] for k in s):.0%}-"
        f"{max(s[k]['cpu'] for k in s):.0%} of a core: req/s is 1 / (CPU per request). "
        f"CPU per request: reference {s['ref']['cpu_us']:,.0f} us, GET {s['get']['cpu_us']:,.0f}"
        f" us, POST {s['post']['cpu_us']:,.0f} us.",
        f"- With {c} clients that each wait for their answer, the mean latency is "
        f"{c} / req/s (Little's law): GET {c / max(1.0, s['get']['rps']) * 1000:.0f} ms, "
        f"POST {c / max(1.0, s['post']['rps']) * 1000:.0f} ms, reference "
        f"{c / max(1.0, s['ref']['rps']) * 1000:.0f} ms. So a p99 under "
        f"{TARGET_P99_MS:.0f} ms needs more than {c / (TARGET_P99_MS / 1000):,.0f} req/s at "
        f"this concurrency, whatever the route does; with GET's p99 at {spread:.1f}x its "
        f"mean, about {c / (TARGET_P99_MS / 1000) * spread:,.0f} req/s.",
        f"- Connections opened during the run: Trawler {pools['trawler']['connects']} "
        f"({pools['trawler']['checkouts']:,} checkouts, pool wait p99 "
        f"{pools['trawler']['wait_ms']['p99']:.0f} ms), reference "
        f"{pools['reference']['connects']} (stock pool).",
    ]
    steals = [r.steal for r in runs]
    if steals:
        lines.append(
            f"- Steal time (this machine is a virtual machine): the hypervisor ran other "
            f"guests for {mean(steals):.0%} of both cores' time during the cases (worst case "
            f"{max(steals):.0%}), time our processes were ready to run and waited."
        )
    busy = max((r.background for r in runs), default=0.0)
    if busy >= 0.15:
        lines.append(
            f"- Other work kept the machine up to {busy:.0%} busy just before some cases "
            "(the rounds alternate so both apps share it; absolute numbers suffer most)."
        )
    return "\n".join(lines)


def docs_section(
    args: argparse.Namespace,
    pg: dict[str, str],
    md: str,
    ratios: list[str],
    notes: str,
) -> str:
    command = "python bench/api.py"
    nice = (
        f"at nice {args.wrk_nice} (the client gets a core when it needs one, as a client on "
        "another machine would; with `--wrk-nice 0` its own waits for a core show up in "
        "the tail it records)"
        if args.wrk_nice
        else "at the default priority"
    )
    extra = []
    for name in ("duration", "warmup", "rounds", "jobs", "wrk_nice"):
        value = getattr(args, name)
        if value != DEFAULTS[name]:
            extra.append(f"--{name.replace('_', '-')} {value:g}")
    if extra:
        command += " " + " ".join(extra)
    return f"""{SECTION}

Measured {time.strftime("%Y-%m-%d")} on {machine_facts(pg)}.

Command: `{command}`. One run: a fresh database with {args.jobs:,} one-URL jobs; Trawler's
`create_app()` without the executor (what `trawler serve --no-worker` serves) and the
reference app, each in its own uvicorn process (1 worker, uvloop, httptools, access log
off); wrk `-t{args.threads} -c{args.connections} --latency` {nice}, {args.warmup:g} s
warm-up per case, then {args.rounds} rounds of {args.duration:g} s per case in alternating
order (req/s: mean of the rounds; p99: the worst round). GET rotates over all job ids with
a Bearer key; POST sends `{{"urls": ["http://example.com/<tag>/<n>"]}}`, a new path each time
(202 once job and task are committed); the tenant limits are off (one tenant submits
>1,000 jobs/s here). PostgreSQL CPU: all `postgres` processes of the machine, per request.
The reference is plain FastAPI + SQLAlchemy ORM: an
`AsyncSession` per request from a dependency, `await session.get(Job, id)`, a pydantic
response model, no auth, the same pool settings ({DEFAULT_POOL}, timeouts, stock
`pool_pre_ping=True`). One wrk thread: with two, on these 2 cores shared with the servers
and PostgreSQL, a wrk thread waiting for a core inflated the p99 it recorded (against the
same Trawler GET, an aiohttp client measured a p99 of ~120 ms, wrk -t2 ~260-320 ms, wrk -t1
~150 ms).

{md}

{chr(10).join(ratios)}

What the numbers are made of:

{notes}
{LIMITS}
"""


DEFAULT_POOL = "pool_size 10, max_overflow 10"
DEFAULT_WRK_NICE = -10 if os.geteuid() == 0 else 0
DEFAULTS: dict[str, Any] = {
    "duration": 15.0,
    "warmup": 3.0,
    "rounds": 2,
    "jobs": 3000,
    "wrk_nice": DEFAULT_WRK_NICE,
}

# From the profiles (py-spy, `--profile`) and the experiments behind them.
LIMITS = """- A database round trip costs the client ~100 us of CPU here (see the queue section;
  on loopback the kernel's send path runs in the sender) and the server about as much. Per
  request the reference makes 6: SQLAlchemy's pre-ping on asyncpg is BEGIN, `;`, ROLLBACK,
  then the session's BEGIN, SELECT, ROLLBACK. Trawler's GET and POST make 1: a checkout
  pings only a connection idle for `POOL_PING_IDLE_S` (0.5 s) or more, or one whose last
  use failed (under load a connection comes back every few ms), and then one autocommit
  statement on the asyncpg connection: the SELECT, or the submission (job, task, host row).
- Both are answered by `HotPathMiddleware` before FastAPI's routing and dependencies, with
  the same functions as their routes, once the key is in the verified-key cache: most of
  either request's CPU was the framework around a one-statement handler.
- A transaction that has sent a NOTIFY holds a database-wide lock from its commit until
  the commit is flushed, so submissions that each notified committed one at a time
  (bench/submit_statement.py). The API's submissions commit without one; a NOTIFY follows
  after the commit, one at a time, covering every submission committed before it.
- The stock asyncio pool lets a new checkout take a connection that was just returned for
  a waiter that has not run yet; the waiter goes back to the end of the line. With 64
  clients on 20 connections that is the reference's p99. Trawler's pool hands connections
  over first come, first served, never closes one while a checkout waits, and keeps its
  overflow connections until no more than pool_size were needed for 30 s (closing each as
  it came back to an idle queue meant 126 connects in a run, each a new server process
  with cold caches; one run each, before and after: POST p99 112-114 ms with 126
  connects, 84-97 ms with 20).
- Full garbage collections scanned every object of the started app: ~85 ms every ~2 s under
  load, most of Trawler's p99 until the lifespan froze the startup objects (`gc.freeze()`);
  they now take 2-4 ms. (The reference, plain, still pays them.)
- What is left is uvicorn, asyncpg and PostgreSQL: a submission costs PostgreSQL about as
  much CPU as the API process (two rows, eight index entries, the foreign-key check, the
  commit), and with wrk, on 2 cores, the machine is ~80% busy at ~1,300 submissions/s."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=DEFAULT_ADMIN_URL, help="server to create DBs on")
    p.add_argument("--duration", type=float, default=DEFAULTS["duration"], help="s per case")
    p.add_argument("--warmup", type=float, default=DEFAULTS["warmup"], help="s per case")
    p.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    p.add_argument("--jobs", type=int, default=DEFAULTS["jobs"], help="jobs to read")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="wrk threads (1: on 2 shared cores a second wrk thread waiting for a core "
        "inflates the tail it records)",
    )
    p.add_argument(
        "--wrk-nice",
        type=int,
        default=DEFAULT_WRK_NICE,
        help="run wrk at this nice value (default -10 as root, else 0): on 2 cores shared "
        "with the server and PostgreSQL, a wrk waiting for a core adds its wait to the "
        "latency it records",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        help="before each case, wait up to this many s for other load to stop",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy each case of round 1 into DIR/<case>.txt (collapsed stacks)",
    )
    p.add_argument("--no-docs", dest="docs", action="store_false", help="do not touch docs/")
    return p.parse_args(argv)


def main() -> int:
    args = parse(sys.argv[1:])
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
