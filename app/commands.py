"""CLI commands beyond serve/migrate/version: worker, scrape, crawl, jobs, export, apikey
(registered on app.cli). Heavy modules are imported inside the commands (see app.cli)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.cli import (
    ADMIN_PANEL,
    SERVICE_PANEL,
    WORK_PANEL,
    CliError,
    JsonOpt,
    ProgressDisplay,
    app,
    duration,
    err,
    load_settings,
    open_database,
    out,
    print_error,
    print_json,
    real_console,
    run_async,
)

if TYPE_CHECKING:
    from pydantic import ValidationError
    from rich.table import Table
    from rich.text import Text

    from app.api.schemas import JobPublic, JobSpecBase
    from app.config import Settings
    from app.database.connection import ConnectionManager
    from app.database.models import ApiKey
    from app.services import export as export_service

jobs_app = typer.Typer(
    help="Jobs: list (a table), show, cancel, delete.",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="API keys: create (shown once), list, revoke.",
    no_args_is_help=True,
)
app.add_typer(jobs_app, name="jobs", rich_help_panel=WORK_PANEL)
app.add_typer(keys_app, name="apikey", rich_help_panel=ADMIN_PANEL)

ADMIN_KEY_FILE = "admin.key"
DEFAULT_TENANT = "admin"
TERMINAL = ("completed", "failed", "cancelled")
WORKER_CHECK_S = 3.0  # how often `--wait` looks for a live worker while it has none
STATUS_STYLE = {
    "queued": "cyan",
    "running": "blue",
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
}

TenantOpt = Annotated[
    str, typer.Option("--tenant", envvar="TRAWLER_TENANT", help="tenant that owns the jobs")
]
JobIdArg = Annotated[str, typer.Argument(metavar="JOB_ID", help="the job's id")]
ExtractOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--extract",
        "-e",
        help="a field: name=css:SEL, name=css:SEL@attr, …[] for all matches, "
        "name=xpath:EXPR, name=builtin:title",
    ),
]


def _job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise CliError(f"not a job id: {value!r}") from None


def _local(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _age(moment: datetime) -> str:
    seconds = max(0, int((datetime.now(UTC) - moment).total_seconds()))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _print_table(table: Table) -> None:
    """On a terminal, fit the table to it; in a pipe or a file, never wrap or cut a cell
    (ids must stay whole for grep and copy-paste)."""
    from rich.console import Console
    from rich.measure import Measurement

    if out.is_terminal:
        out.print(table)
    else:
        console = real_console(out)
        natural = Measurement.get(console, console.options.update(width=10_000), table).maximum
        # Console.print never goes wider than its console: print on one as wide as needed
        Console(file=out.file, width=max(out.width, natural)).print(table)


# --------------------------------------------------------------------------- admin key


async def ensure_admin_key(db: ConnectionManager, data_dir: Path) -> str | None:
    """On a first start with no keys: create an admin key, save it (0600), return it."""
    from sqlalchemy import func, select

    from app.database.models import ApiKey
    from app.services import apikeys

    async with db.session() as session:
        count = (await session.execute(select(func.count()).select_from(ApiKey))).scalar_one()
        if count:
            return None
        _row, key = await apikeys.create_key(session, "admin", DEFAULT_TENANT, admin=True)
    path = data_dir / ADMIN_KEY_FILE

    def _save() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")

    await asyncio.to_thread(_save)
    return key


# --------------------------------------------------------------------------- worker


@app.command(rich_help_panel=SERVICE_PANEL)
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="fetches in flight [TRAWLER_WORKER_CONCURRENCY]", min=1)
    ] = None,
) -> None:
    """Run an executor alone: claim and run tasks until SIGTERM (graceful drain).

    Start any number, on any machine, pointed at one PostgreSQL.
    """
    from app.utils.runner import run_worker

    settings = load_settings()

    async def main() -> int:
        # no schema check: during a rolling upgrade a worker may start beside a database
        # that `trawler serve` is about to migrate (migrations expand, then contract;
        # docs/OPERATIONS.md, "Upgrading", lists the revisions that need a stop instead)
        async with open_database(
            settings, application_name="trawler-worker", wait_s=15.0, schema=False
        ) as (db, _):
            return await run_worker(db, concurrency=concurrency)

    raise typer.Exit(run_async(main()))


# --------------------------------------------------------------------------- scrape, crawl


def parse_extract(items: list[str]) -> dict[str, dict[str, Any]]:
    """`name=css:SEL`, `name=xpath:EXPR`, `name=builtin:title`; `@attr` takes an attribute,
    a trailing `[]` takes every match: `links=css:a@href[]`."""
    spec: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        engine, sep2, selector = rest.partition(":")
        if not sep or not sep2 or not name or not selector:
            raise CliError(f"--extract {item!r}: expected name=css:SELECTOR (or xpath:/builtin:)")
        if engine not in ("css", "xpath", "builtin"):
            raise CliError(f"--extract {item!r}: engine must be css, xpath or builtin")
        field: dict[str, Any] = {}
        if selector.endswith("[]"):
            selector, field["all"] = selector[:-2], True
        if engine == "css" and "@" in selector:
            selector, attr = selector.rsplit("@", 1)
            field["value"] = f"attr:{attr}"
        field[engine] = selector
        spec[name] = field
    return spec


def _where(loc: tuple[int | str, ...]) -> str:
    # ("urls", 2) reads better as "URL 3" on a command line
    if len(loc) >= 2 and loc[0] in ("urls", "seeds") and isinstance(loc[1], int):
        return f"{'URL' if loc[0] == 'urls' else 'seed'} {loc[1] + 1}"
    return ".".join(str(p) for p in loc)


def _validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{_where(tuple(e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
        for e in error.errors()[:5]
    )


def _request(kind: str, data: dict[str, Any]) -> JobSpecBase:
    from pydantic import ValidationError

    from app.api.schemas import CrawlCreate, ScrapeCreate

    model = ScrapeCreate if kind == "scrape" else CrawlCreate
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise CliError(_validation_message(error)) from None


async def live_workers(db: ConnectionManager) -> int:
    from sqlalchemy import text

    async with db.connect() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM workers WHERE state = 'running' "
                        "AND heartbeat_at > now() - make_interval(secs => :stale)"
                    ),
                    {"stale": db.settings.worker_stale_seconds},
                )
            ).scalar_one()
        )


async def _job(db: ConnectionManager, tenant: str, job_id: uuid.UUID) -> tuple[JobPublic, int]:
    """The job resource and its skipped-task count (robots.txt, scope; not in the resource)."""
    from sqlalchemy import select

    from app.database.models import Job
    from app.services import jobs as job_service

    async with db.session() as session:
        job = await job_service.require_job(session, tenant, job_id)
        skipped = (await session.execute(select(Job.skipped).where(Job.id == job_id))).scalar()
    return job, int(skipped or 0)


def _counts(job: JobPublic, skipped: int) -> str:
    p = job.progress
    return f"ok {p.succeeded}, failed {p.failed}, skipped {skipped}"


async def wait_with_progress(
    db: ConnectionManager, tenant: str, job_id: uuid.UUID
) -> tuple[JobPublic, int]:
    """Show progress until the job ends; returns the final job and its skipped count.

    With no live worker, an executor runs in this process until the job ends. That is
    checked again every few seconds: the only live worker may be another `--wait`
    command's, which stops when its own job ends.
    """
    from app.database.connection import ConnectionManager
    from app.utils.executor import AsyncJobExecutor

    executor: AsyncJobExecutor | None = None
    worker_db: ConnectionManager | None = None
    next_check = 0.0
    try:
        with ProgressDisplay("pages") as progress:
            while True:
                if executor is None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + WORKER_CHECK_S
                    if not await live_workers(db):
                        worker_db = ConnectionManager(
                            db.settings, application_name="trawler-worker"
                        )
                        executor = AsyncJobExecutor(worker_db, db.settings)
                        await executor.start()
                        err.print("no live worker: running one in this process", style="dim")
                job, skipped = await _job(db, tenant, job_id)
                p = job.progress
                # skipped and cancelled tasks are finished too
                progress.update(
                    job.status.value, p.total - p.queued - p.running, p.total or None,
                    _counts(job, skipped),
                )  # fmt: skip
                if job.status.value in TERMINAL:
                    return job, skipped
                await asyncio.sleep(0.3)
    finally:
        if executor is not None:
            await executor.stop(grace=5.0)
        if worker_db is not None:
            await worker_db.dispose()


def _summary_json(job: JobPublic, skipped: int, seconds: float) -> dict[str, Any]:
    """The job resource plus a `summary`: what a script needs after `--wait --json`."""
    p = job.progress
    done = p.succeeded + p.failed
    return {
        **job.model_dump(mode="json"),
        "summary": {
            "succeeded": p.succeeded,
            "failed": p.failed,
            "skipped": skipped,
            "total": p.total,
            "elapsed_s": round(seconds, 3),
            "pages_per_s": round(done / seconds, 2) if seconds > 0 else None,
        },
    }


def _print_summary(job: JobPublic, skipped: int, seconds: float) -> None:
    p = job.progress
    status = job.status.value
    done = p.succeeded + p.failed
    out.print(
        f"[bold {STATUS_STYLE[status]}]{status}[/] {job.kind.value} job {job.id} "
        f"in {duration(seconds)}",
        highlight=False,
    )
    rate = f", {done / seconds:.1f} pages/s" if seconds > 0 and done else ""
    out.print(
        f"  {p.succeeded} succeeded, {p.failed} failed, {skipped} skipped "
        f"(of {p.total} pages{rate})",
        highlight=False,
    )
    if job.error:
        out.print(f"  reason: {job.error}", style="red", highlight=False, markup=False)
    if p.succeeded or p.failed:
        out.print(f"  export: trawler export {job.id} -f csv", style="dim", highlight=False)


async def _submit_and_maybe_wait(
    settings: Settings, tenant: str, request: JobSpecBase, *, wait: bool, as_json: bool
) -> bool:
    """Submit; with `wait`, follow the job and print its summary. True unless the job
    ended failed or cancelled."""
    from app.scraper.ssrf import SSRFGuard
    from app.services import jobs as job_service

    async with open_database(settings) as (db, _):
        guard = SSRFGuard(
            allow_private=settings.allow_private_networks, allow_cidrs=settings.allowed_cidrs
        )
        async with db.session() as session:
            job, _created = await job_service.submit_job(session, tenant, request, guard=guard)
        if not wait:
            if as_json:
                print_json(job.model_dump(mode="json"))
            else:
                out.print(
                    f"job {job.id} queued ({job.progress.total} URLs); "
                    f"follow it with `trawler jobs show {job.id}`",
                    highlight=False,
                )
            return True
        started = time.monotonic()
        try:
            final, skipped = await wait_with_progress(db, tenant, job.id)
        except asyncio.CancelledError:
            err.print(
                f"job {job.id} goes on without this command (a worker or `trawler serve` "
                f"finishes it; `trawler jobs cancel {job.id}` stops it)",
                style="yellow",
                highlight=False,
            )
            raise
        seconds = time.monotonic() - started
    if as_json:
        print_json(_summary_json(final, skipped, seconds))
    else:
        _print_summary(final, skipped, seconds)
    if final.status.value != "completed":
        reason = f": {final.error}" if final.error else ""
        print_error(f"job {final.id} {final.status.value}{reason}")
        return False
    return True


WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="follow the job with a progress bar, then print a summary; "
        "exit status 1 if it failed or was cancelled",
    ),
]


@app.command(rich_help_panel=WORK_PANEL)
def scrape(
    urls: Annotated[list[str], typer.Argument(metavar="URL", help="http(s) URLs to fetch")],
    extract: ExtractOpt = None,
    wait: WaitOpt = False,
    priority: Annotated[int, typer.Option(min=-100, max=100)] = 0,
    max_attempts: Annotated[int, typer.Option(min=1, max=20)] = 3,
    timeout: Annotated[float, typer.Option(help="per-page timeout, seconds", min=1)] = 30,
    tenant: TenantOpt = DEFAULT_TENANT,
    as_json: JsonOpt = False,
) -> None:
    """Submit a scrape job for a list of URLs (--wait follows it to the end)."""
    settings = load_settings()
    request = _request(
        "scrape",
        {
            "urls": urls,
            "extract": parse_extract(extract or []),
            "priority": priority,
            "max_attempts": max_attempts,
            "options": {"timeout_s": timeout},
        },
    )
    if not run_async(_submit_and_maybe_wait(settings, tenant, request, wait=wait, as_json=as_json)):
        raise typer.Exit(1)


@app.command(rich_help_panel=WORK_PANEL)
def crawl(
    seeds: Annotated[list[str], typer.Argument(metavar="URL", help="start URL(s)")],
    max_pages: Annotated[int, typer.Option(min=1, max=1_000_000)] = 1000,
    max_depth: Annotated[int, typer.Option(min=0, max=100)] = 3,
    extract: ExtractOpt = None,
    include: Annotated[list[str] | None, typer.Option(help="regex a URL must match")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="regex that drops a URL")] = None,
    sitemaps: Annotated[bool, typer.Option("--sitemaps", help="also read sitemaps")] = False,
    ignore_robots: Annotated[
        bool, typer.Option("--ignore-robots", help="do not honour robots.txt")
    ] = False,
    per_host: Annotated[int, typer.Option(help="fetches in flight per host", min=1)] = 4,
    delay_ms: Annotated[int, typer.Option(help="pause between fetches per host", min=0)] = 0,
    wait: WaitOpt = False,
    tenant: TenantOpt = DEFAULT_TENANT,
    as_json: JsonOpt = False,
) -> None:
    """Crawl a site from its seed URL(s), following links within the rules (--wait follows it)."""
    settings = load_settings()
    request = _request(
        "crawl",
        {
            "seeds": seeds,
            "extract": parse_extract(extract or []),
            "follow": {
                "max_pages": max_pages,
                "max_depth": max_depth,
                "include": include or [],
                "exclude": exclude or [],
                "sitemaps": sitemaps,
            },
            "politeness": {
                "respect_robots": not ignore_robots,
                "per_host_concurrency": per_host,
                "delay_ms": delay_ms,
            },
        },
    )
    if not run_async(_submit_and_maybe_wait(settings, tenant, request, wait=wait, as_json=as_json)):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- jobs


def _choices(value: str | None, allowed: tuple[str, ...], what: str) -> list[str]:
    """`running,queued` -> ["running", "queued"], each checked against `allowed`."""
    chosen = [part.strip() for part in (value or "").split(",") if part.strip()]
    for part in chosen:
        if part not in allowed:
            raise CliError(f"unknown {what} {part!r}; one of: {', '.join(allowed)}")
    return chosen


def _progress_cell(job: JobPublic) -> Text:
    from rich.text import Text

    p = job.progress
    cell = Text(f"{p.total - p.queued - p.running}/{p.total}")
    if p.failed:
        cell.append(f" ({p.failed} failed)", style="red")
    return cell


@jobs_app.command("list")
def jobs_list(
    status: Annotated[
        str | None,
        typer.Option(help="only these statuses, e.g. running,queued", show_default=False),
    ] = None,
    kind: Annotated[str | None, typer.Option(help="only scrape or crawl jobs")] = None,
    limit: Annotated[int, typer.Option(help="newest jobs shown", min=1, max=200)] = 20,
    tenant: TenantOpt = DEFAULT_TENANT,
    as_json: JsonOpt = False,
) -> None:
    """List recent jobs, newest first, as a table (id, kind, status, progress, created, age)."""
    from rich.table import Table
    from rich.text import Text

    from app.database.models import JobKind, JobStatus
    from app.services import jobs as job_service

    statuses = _choices(status, tuple(s.value for s in JobStatus), "status")
    kinds = _choices(kind, tuple(k.value for k in JobKind), "kind")
    if len(kinds) > 1:
        raise CliError("--kind takes one kind: scrape or crawl")
    settings = load_settings()
    filters = job_service.JobFilters(
        statuses=[JobStatus(s) for s in statuses], kind=JobKind(kinds[0]) if kinds else None
    )

    async def main() -> list[JobPublic]:
        async with open_database(settings) as (db, _), db.session() as session:
            items, _next = await job_service.list_jobs(session, tenant, filters, limit=limit)
            return items

    items = run_async(main())
    if as_json:
        print_json([j.model_dump(mode="json") for j in items])
        return
    if not items:
        err.print(f"no jobs for tenant {tenant!r} match", style="dim", highlight=False)
        return
    table = Table("id", "kind", "status", "progress", "created", "age")
    table.columns[0].no_wrap = True
    for job in items:
        table.add_row(
            str(job.id),
            job.kind.value,
            Text(job.status.value, style=STATUS_STYLE[job.status.value]),
            _progress_cell(job),
            _local(job.created_at),
            _age(job.created_at),
        )
    _print_table(table)
    if len(items) == limit:
        err.print(f"the {limit} newest; --limit N shows more", style="dim", highlight=False)


def _show(job: JobPublic, skipped: int) -> None:
    from rich.table import Table
    from rich.text import Text

    p = job.progress
    status = job.status.value
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("job", Text(str(job.id)))
    grid.add_row("kind", job.kind.value)
    grid.add_row("status", Text(status, style=STATUS_STYLE[status]))
    grid.add_row(
        "progress",
        Text(
            f"{p.total - p.queued - p.running}/{p.total} done: {p.succeeded} succeeded, "
            f"{p.failed} failed, {skipped} skipped; {p.queued} queued, {p.running} running"
        ),
    )
    grid.add_row("priority", str(job.priority))
    grid.add_row("created", f"{_local(job.created_at)} ({_age(job.created_at)} ago)")
    grid.add_row("started", _local(job.started_at))
    took = ""
    if job.started_at is not None and job.finished_at is not None:
        took = f" (took {duration((job.finished_at - job.started_at).total_seconds())})"
    grid.add_row("finished", _local(job.finished_at) + took)
    seeds = job.spec.get("seeds")
    if seeds:
        grid.add_row("seeds", Text("\n".join(str(s) for s in seeds)))
    elif "url_count" in job.spec:
        grid.add_row("urls", str(job.spec["url_count"]))
    follow = job.spec.get("follow") or {}
    if follow:
        grid.add_row(
            "follow",
            f"max depth {follow.get('max_depth')}, max pages {follow.get('max_pages')}",
        )
    extract = job.spec.get("extract") or {}
    if extract:
        grid.add_row("extract", Text(", ".join(extract)))
    if job.error:
        grid.add_row("error", Text(job.error, style="red"))
    out.print(grid)


@jobs_app.command("show")
def jobs_show(
    job_id: JobIdArg, tenant: TenantOpt = DEFAULT_TENANT, as_json: JsonOpt = False
) -> None:
    """Show one job: status, progress, timings, what it fetches (--json: the API resource)."""
    ident = _job_id(job_id)
    settings = load_settings()

    async def main() -> tuple[JobPublic, int]:
        async with open_database(settings) as (db, _):
            return await _job(db, tenant, ident)

    job, skipped = run_async(main())
    if as_json:
        print_json(job.model_dump(mode="json"))
    else:
        _show(job, skipped)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: JobIdArg, tenant: TenantOpt = DEFAULT_TENANT, as_json: JsonOpt = False
) -> None:
    """Cancel a queued or running job (idempotent)."""
    from app.services import jobs as job_service

    ident = _job_id(job_id)
    settings = load_settings()

    async def main() -> JobPublic:
        async with open_database(settings) as (db, _), db.session() as session:
            return await job_service.cancel_job(session, tenant, ident)

    job = run_async(main())
    if as_json:
        print_json(job.model_dump(mode="json"))
    else:
        out.print(f"job {job.id}: {job.status.value}", highlight=False)


@jobs_app.command("delete")
def jobs_delete(
    job_id: JobIdArg, tenant: TenantOpt = DEFAULT_TENANT, as_json: JsonOpt = False
) -> None:
    """Delete a finished job with its pages (cancel a running one first)."""
    from app.services import jobs as job_service

    ident = _job_id(job_id)
    settings = load_settings()

    async def main() -> None:
        async with open_database(settings) as (db, _), db.session() as session:
            await job_service.delete_job(session, tenant, ident)

    run_async(main())
    if as_json:
        print_json({"id": str(ident), "deleted": True})
    else:
        out.print(f"job {ident} deleted", highlight=False)


# --------------------------------------------------------------------------- export


class _FileSink:
    """Where `trawler export` writes: a temporary file beside the target, renamed into
    place only once the export is complete (a broken export never looks like a file),
    or standard output. Every write goes through a thread: nothing blocks the loop."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.to_stdout = target == "-"
        self.size = 0
        self._handle: Any = None
        self._temp: Path | None = None

    async def open(self) -> None:
        if self.to_stdout:
            self._handle = sys.stdout.buffer
            return
        final = Path(self.target)

        def _open() -> tuple[Any, Path]:
            fd, name = tempfile.mkstemp(
                prefix=f".{final.name}.", suffix=".part", dir=final.parent.resolve()
            )
            return os.fdopen(fd, "wb"), Path(name)

        try:
            self._handle, self._temp = await asyncio.to_thread(_open)
        except OSError as error:
            raise CliError(f"cannot write {self.target}: {error.strerror or error}") from None

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._handle.write, data)
        self.size += len(data)

    async def commit(self) -> None:
        if self.to_stdout:
            await asyncio.to_thread(self._handle.flush)
            return
        assert self._temp is not None
        temp, final = self._temp, Path(self.target)

        def _commit() -> None:
            self._handle.close()
            os.chmod(temp, 0o644)  # mkstemp made it 0600: give it a normal file's mode
            os.replace(temp, final)

        await asyncio.to_thread(_commit)
        self._temp = None

    async def discard(self) -> None:
        if self._temp is None:
            return
        temp = self._temp

        def _discard() -> None:
            self._handle.close()
            temp.unlink(missing_ok=True)

        await asyncio.to_thread(_discard)
        self._temp = None


async def export_to_file(
    db: ConnectionManager,
    tenant: str,
    job_id: uuid.UUID,
    request: export_service.ExportRequest,
    output: str | None,
) -> tuple[export_service.Export, _FileSink, float]:
    """Stream one export into `output` (default: the export's file name) with a progress
    bar of the rows written; returns the finished export, the sink and the seconds taken."""
    from app.services import export as export_service

    started = time.monotonic()
    export = await export_service.open_export(db, tenant, job_id, request, count=True)
    sink = _FileSink(output or export.filename)
    try:
        await sink.open()
        pending: list[bytes] = []
        size = 0
        with ProgressDisplay("rows") as progress:
            async for chunk in export.chunks():
                pending.append(chunk)
                size += len(chunk)
                if size >= 1 << 20:  # one thread hop per MiB, not per chunk
                    await sink.write(b"".join(pending))
                    pending.clear()
                    size = 0
                progress.update("export", export.rows, export.total)
            if pending:
                await sink.write(b"".join(pending))
            progress.update("done", export.rows, export.total)
        await sink.commit()
    except export_service.ExportFailed as error:
        raise CliError(str(error)) from None
    finally:
        await export.aclose()
        await sink.discard()
    return export, sink, time.monotonic() - started


@app.command("export", rich_help_panel=WORK_PANEL)
def export_job(
    job_id: JobIdArg,
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv | jsonl | json | xlsx")] = "csv",
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="file to write, '-' for standard output [job-<id>.<format>]"
        ),
    ] = None,
    fields: Annotated[
        str | None, typer.Option(help="columns to keep, in this order: url,price,title")
    ] = None,
    status: Annotated[str, typer.Option(help="pages to export: ok | error | all")] = "all",
    bom: Annotated[
        bool, typer.Option("--bom", help="CSV: start with a UTF-8 BOM (for spreadsheets)")
    ] = False,
    tenant: TenantOpt = DEFAULT_TENANT,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the summary as JSON (needs a file, not '-')")
    ] = False,
) -> None:
    """Export a job's pages to a file (a consistent snapshot, even while the job runs)."""
    ident = _job_id(job_id)
    if as_json and output == "-":
        raise CliError("--json prints the summary on standard output: give --output a file")
    from app.services import export as export_service

    request = export_service.make_request(
        fmt, fields=[fields] if fields else None, status=status, bom=bom
    )
    settings = load_settings()

    async def main() -> tuple[export_service.Export, _FileSink, float]:
        async with open_database(settings) as (db, _):
            return await export_to_file(db, tenant, ident, request, output)

    export, sink, seconds = run_async(main())
    if as_json:
        print_json(
            {
                "job_id": str(ident),
                "format": request.format,
                "rows": export.rows,
                "bytes": sink.size,
                "output": str(Path(sink.target).resolve()),
                "elapsed_s": round(seconds, 3),
            }
        )
        return
    where = "standard output" if sink.to_stdout else sink.target
    summary = err if sink.to_stdout else out
    summary.print(
        f"{export.rows:,} rows ({sink.size:,} bytes, {request.format}) written to {where} "
        f"in {seconds:.1f}s",
        highlight=False,
    )


# --------------------------------------------------------------------------- apikey


def _key_json(row: ApiKey) -> dict[str, Any]:
    def iso(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {
        "id": str(row.id),
        "name": row.name,
        "tenant": row.tenant,
        "role": row.role.value,
        "prefix": row.prefix,
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
        "revoked_at": iso(row.revoked_at),
        "revoked": row.revoked_at is not None,
    }


@keys_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="a label for the key")],
    tenant: Annotated[str | None, typer.Option(help="defaults to the name")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="may use admin routes")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a key; it is printed once (alone on stdout) and stored only hashed."""
    from app.services import apikeys

    settings = load_settings()

    async def main() -> tuple[ApiKey, str]:
        async with open_database(settings) as (db, _), db.session() as session:
            return await apikeys.create_key(session, name, tenant, admin=admin)

    row, key = run_async(main())
    if as_json:
        print_json({**_key_json(row), "key": key})
        return
    err.print(
        f"key {row.id} for tenant {row.tenant!r} ({row.role.value}); shown once:", highlight=False
    )
    out.print(key, highlight=False)


@keys_app.command("list")
def apikey_list(as_json: JsonOpt = False) -> None:
    """List keys (never their secrets)."""
    from rich.table import Table
    from rich.text import Text

    from app.services import apikeys

    settings = load_settings()

    async def main() -> list[dict[str, Any]]:
        async with open_database(settings) as (db, _), db.session() as session:
            return [_key_json(k) for k in await apikeys.list_keys(session)]

    keys = run_async(main())
    if as_json:
        print_json(keys)
        return
    table = Table("id", "name", "tenant", "role", "prefix", "created", "last used", "revoked")
    table.columns[0].no_wrap = True
    for k in keys:
        table.add_row(
            k["id"],
            k["name"],
            k["tenant"],
            k["role"],
            k["prefix"],
            _local(datetime.fromisoformat(k["created_at"])),
            _age(datetime.fromisoformat(k["last_used_at"])) + " ago" if k["last_used_at"] else "",
            Text("revoked", style="red") if k["revoked"] else "",
        )
    _print_table(table)


@keys_app.command("revoke")
def apikey_revoke(
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="the key's id")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key; requests with it are refused from now on (idempotent)."""
    from app.services import apikeys

    try:
        ident = uuid.UUID(key_id)
    except ValueError:
        raise CliError(f"not a key id: {key_id!r}") from None
    settings = load_settings()

    async def main() -> tuple[ApiKey | None, bool]:
        async with open_database(settings) as (db, _), db.session() as session:
            known = await apikeys.get_key(session, ident)
            already = known is not None and known.revoked_at is not None
            return await apikeys.revoke_key(session, ident), already

    row, already = run_async(main())
    if row is None:
        raise CliError(f"key {key_id} not found")
    if as_json:
        print_json(_key_json(row))
    elif already:
        out.print(f"key {row.id} was already revoked ({_local(row.revoked_at)})", highlight=False)
    else:
        out.print(f"key {row.id} revoked", highlight=False)


# `trawler --help` shows one panel per purpose, in this order (registration order inside)
_PANELS = [SERVICE_PANEL, WORK_PANEL, ADMIN_PANEL]
app.registered_commands.sort(
    key=lambda c: _PANELS.index(c.rich_help_panel) if c.rich_help_panel in _PANELS else 99
)
