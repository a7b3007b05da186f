"""CLI commands beyond serve/migrate: worker, scrape, jobs, export, apikey (registered on
app.cli)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select, text

from app.api.errors import TrawlerError
from app.api.schemas import CrawlCreate, JobPublic, JobSpecBase, ScrapeCreate
from app.cli import CliError, _fail, app, err, load_settings, open_database, out, run_async
from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.models import ApiKey, JobStatus
from app.scraper.ssrf import SSRFGuard
from app.services import apikeys
from app.services import export as export_service
from app.services import jobs as job_service
from app.utils.executor import AsyncJobExecutor
from app.utils.runner import run_worker

jobs_app = typer.Typer(help="List, show, cancel and delete jobs.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="apikey")

ADMIN_KEY_FILE = "admin.key"
DEFAULT_TENANT = "admin"

TenantOpt = Annotated[
    str, typer.Option("--tenant", envvar="TRAWLER_TENANT", help="tenant that owns the jobs")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _print_json(value: Any) -> None:
    out.print_json(orjson.dumps(value, default=str).decode())


# --------------------------------------------------------------------------- admin key


async def ensure_admin_key(db: ConnectionManager, data_dir: Path) -> str | None:
    """On a first start with no keys: create an admin key, save it (0600), return it."""
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


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="fetches in flight [TRAWLER_WORKER_CONCURRENCY]", min=1)
    ] = None,
) -> None:
    """Run an executor: claim and run tasks until SIGTERM (graceful drain)."""
    settings = load_settings()

    async def main() -> int:
        async with open_database(settings, application_name="trawler-worker", wait_s=15.0) as (
            db,
            _,
        ):
            return await run_worker(db, concurrency=concurrency)

    raise typer.Exit(run_async(main()))


# --------------------------------------------------------------------------- scrape


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


def _validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
        for e in error.errors()[:5]
    )


async def live_workers(db: ConnectionManager) -> int:
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


async def _job(db: ConnectionManager, tenant: str, job_id: uuid.UUID) -> JobPublic:
    async with db.session() as session:
        return await job_service.require_job(session, tenant, job_id)


async def wait_with_progress(db: ConnectionManager, tenant: str, job_id: uuid.UUID) -> JobPublic:
    """Show a live progress bar until the job ends; run an executor here if none is live."""
    executor: AsyncJobExecutor | None = None
    worker_db: ConnectionManager | None = None
    if not await live_workers(db):
        worker_db = ConnectionManager(db.settings, application_name="trawler-worker")
        executor = AsyncJobExecutor(worker_db, db.settings)
        await executor.start()
        err.print("[dim]no live worker: running one in this process[/]")
    started = time.monotonic()
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "{task.fields[rate]} pages/s  ok {task.fields[ok]}  failed {task.fields[bad]}"
            ),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        ) as progress:
            bar = progress.add_task("queued", total=None, rate="0.0", ok=0, bad=0)
            while True:
                job = await _job(db, tenant, job_id)
                p = job.progress
                done = p.succeeded + p.failed
                elapsed = max(time.monotonic() - started, 1e-6)
                progress.update(
                    bar,
                    description=job.status.value,
                    total=p.total or None,
                    completed=done,
                    rate=f"{done / elapsed:.1f}",
                    ok=p.succeeded,
                    bad=p.failed,
                )
                if job.status.value in ("completed", "failed", "cancelled"):
                    return job
                await asyncio.sleep(0.3)
    finally:
        if executor is not None and worker_db is not None:
            await executor.stop(grace=5.0)
            await worker_db.dispose()


def _summary(job: JobPublic, seconds: float) -> None:
    p = job.progress
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(job.status, "")
    out.print(
        f"[bold {colour}]{job.status.value}[/]: {p.succeeded} ok, {p.failed} failed of "
        f"{p.total} in {seconds:.1f}s — job {job.id}"
    )
    if job.error:
        out.print(f"[red]{job.error}[/]")


@app.command()
def scrape(
    urls: Annotated[list[str], typer.Argument(help="http(s) URLs to fetch")],
    extract: Annotated[
        list[str] | None,
        typer.Option("--extract", "-e", help="name=css:SEL[@attr][[]] | name=xpath:EXPR"),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until the job ends")] = False,
    priority: Annotated[int, typer.Option(min=-100, max=100)] = 0,
    max_attempts: Annotated[int, typer.Option(min=1, max=20)] = 3,
    timeout: Annotated[float, typer.Option(help="per-page timeout, seconds", min=1)] = 30,
    tenant: TenantOpt = DEFAULT_TENANT,
    as_json: JsonOpt = False,
) -> None:
    """Submit a scrape job (and with --wait, follow it to the end)."""
    settings = load_settings()
    try:
        request = ScrapeCreate.model_validate(
            {
                "urls": urls,
                "extract": parse_extract(extract or []),
                "priority": priority,
                "max_attempts": max_attempts,
                "options": {"timeout_s": timeout},
            }
        )
    except (ValidationError, CliError) as error:
        message = _validation_message(error) if isinstance(error, ValidationError) else str(error)
        raise _fail(message) from None
    run_async(_submit_and_maybe_wait(settings, tenant, request, wait=wait, as_json=as_json))


async def _submit_and_maybe_wait(
    settings: Settings, tenant: str, request: JobSpecBase, *, wait: bool, as_json: bool
) -> None:
    async with open_database(settings) as (db, _):
        guard = SSRFGuard(
            allow_private=settings.allow_private_networks, allow_cidrs=settings.allowed_cidrs
        )
        try:
            async with db.session() as session:
                job, _created = await job_service.submit_job(session, tenant, request, guard=guard)
        except TrawlerError as error:
            raise CliError(error.detail) from None
        if not wait:
            if as_json:
                _print_json(job.model_dump(mode="json"))
            else:
                out.print(f"job {job.id} queued ({job.progress.total} URLs)")
            return
        started = time.monotonic()
        final = await wait_with_progress(db, tenant, job.id)
        if as_json:
            _print_json(final.model_dump(mode="json"))
        else:
            _summary(final, time.monotonic() - started)


@app.command()
def crawl(
    seeds: Annotated[list[str], typer.Argument(help="start URL(s)")],
    max_pages: Annotated[int, typer.Option(min=1, max=1_000_000)] = 1000,
    max_depth: Annotated[int, typer.Option(min=0, max=100)] = 3,
    extract: Annotated[
        list[str] | None,
        typer.Option("--extract", "-e", help="name=css:SEL[@attr][[]] | name=xpath:EXPR"),
    ] = None,
    include: Annotated[list[str] | None, typer.Option(help="regex a URL must match")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="regex that drops a URL")] = None,
    sitemaps: Annotated[bool, typer.Option("--sitemaps", help="also read sitemaps")] = False,
    ignore_robots: Annotated[
        bool, typer.Option("--ignore-robots", help="do not honour robots.txt")
    ] = False,
    per_host: Annotated[int, typer.Option(help="fetches in flight per host", min=1)] = 4,
    delay_ms: Annotated[int, typer.Option(help="pause between fetches per host", min=0)] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until the crawl ends")] = (
        False
    ),
    tenant: TenantOpt = DEFAULT_TENANT,
    as_json: JsonOpt = False,
) -> None:
    """Crawl a site from its seed URL(s), following links within the rules."""
    settings = load_settings()
    try:
        request = CrawlCreate.model_validate(
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
            }
        )
    except (ValidationError, CliError) as error:
        message = _validation_message(error) if isinstance(error, ValidationError) else str(error)
        raise _fail(message) from None
    run_async(_submit_and_maybe_wait(settings, tenant, request, wait=wait, as_json=as_json))


# --------------------------------------------------------------------------- jobs


def _job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise CliError(f"not a job id: {value!r}") from None


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="filter, e.g. running,queued")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    tenant: TenantOpt = DEFAULT_TENANT,
    as_json: JsonOpt = False,
) -> None:
    """List recent jobs, newest first."""
    settings = load_settings()

    async def main() -> list[JobPublic]:
        try:
            wanted = [JobStatus(s.strip()) for s in status.split(",")] if status else []
        except ValueError as error:
            raise CliError(str(error)) from None
        filters = job_service.JobFilters(statuses=wanted)
        async with open_database(settings) as (db, _), db.session() as session:
            items, _next = await job_service.list_jobs(session, tenant, filters, limit=limit)
            return items

    items = run_async(main())
    if as_json:
        _print_json([j.model_dump(mode="json") for j in items])
        return
    table = Table("id", "kind", "status", "progress", "created")
    for job in items:
        p = job.progress
        table.add_row(
            str(job.id),
            job.kind.value,
            job.status.value,
            f"{p.succeeded + p.failed}/{p.total} ({p.failed} failed)",
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, tenant: TenantOpt = DEFAULT_TENANT) -> None:
    """Show one job as JSON."""
    settings = load_settings()

    async def main() -> JobPublic:
        async with open_database(settings) as (db, _):
            try:
                return await _job(db, tenant, _job_id(job_id))
            except TrawlerError as error:
                raise CliError(error.detail) from None

    _print_json(run_async(main()).model_dump(mode="json"))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, tenant: TenantOpt = DEFAULT_TENANT) -> None:
    """Cancel a queued or running job (idempotent)."""
    settings = load_settings()

    async def main() -> JobPublic:
        async with open_database(settings) as (db, _):
            try:
                async with db.session() as session:
                    return await job_service.cancel_job(session, tenant, _job_id(job_id))
            except TrawlerError as error:
                raise CliError(error.detail) from None

    job = run_async(main())
    out.print(f"job {job.id}: {job.status.value}")


@jobs_app.command("delete")
def jobs_delete(job_id: str, tenant: TenantOpt = DEFAULT_TENANT) -> None:
    """Delete a finished job with its pages."""
    settings = load_settings()

    async def main() -> None:
        async with open_database(settings) as (db, _):
            try:
                async with db.session() as session:
                    await job_service.delete_job(session, tenant, _job_id(job_id))
            except TrawlerError as error:
                raise CliError(error.detail) from None

    run_async(main())
    out.print(f"job {job_id} deleted")


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
    started = time.monotonic()
    try:
        export = await export_service.open_export(db, tenant, job_id, request, count=True)
    except TrawlerError as error:
        raise CliError(error.detail) from None
    sink = _FileSink(output or export.filename)
    try:
        await sink.open()
        pending: list[bytes] = []
        size = 0
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows  {task.fields[rate]} rows/s"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        ) as progress:
            bar = progress.add_task("export", total=export.total, rate="0")
            async for chunk in export.chunks():
                pending.append(chunk)
                size += len(chunk)
                if size >= 1 << 20:  # one thread hop per MiB, not per chunk
                    await sink.write(b"".join(pending))
                    pending.clear()
                    size = 0
                elapsed = max(time.monotonic() - started, 1e-6)
                progress.update(bar, completed=export.rows, rate=f"{export.rows / elapsed:,.0f}")
            if pending:
                await sink.write(b"".join(pending))
            progress.update(bar, completed=export.rows, description="done")
        await sink.commit()
    except export_service.ExportFailed as error:
        raise CliError(str(error)) from None
    finally:
        await export.aclose()
        await sink.discard()
    return export, sink, time.monotonic() - started


@app.command("export")
def export_job(
    job_id: Annotated[str, typer.Argument(help="the job's id")],
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
) -> None:
    """Export a job's pages (a consistent snapshot, even while it runs) to a file."""
    settings = load_settings()
    try:
        request = export_service.make_request(
            fmt, fields=[fields] if fields else None, status=status, bom=bom
        )
    except TrawlerError as error:
        raise _fail(error.detail) from None

    async def main() -> tuple[export_service.Export, _FileSink, float]:
        ident = _job_id(job_id)
        async with open_database(settings) as (db, _):
            return await export_to_file(db, tenant, ident, request, output)

    export, sink, seconds = run_async(main())
    where = "standard output" if sink.to_stdout else sink.target
    summary = err if sink.to_stdout else out
    summary.print(
        f"{export.rows:,} rows ({sink.size:,} bytes, {request.format}) written to {where} "
        f"in {seconds:.1f}s",
        highlight=False,
    )


# --------------------------------------------------------------------------- apikey


@keys_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="a label for the key")],
    tenant: Annotated[str | None, typer.Option(help="defaults to the name")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="may use admin routes")] = False,
) -> None:
    """Create a key; it is printed once and stored only hashed."""
    settings = load_settings()

    async def main() -> tuple[ApiKey, str]:
        async with open_database(settings) as (db, _), db.session() as session:
            return await apikeys.create_key(session, name, tenant, admin=admin)

    row, key = run_async(main())
    err.print(f"key {row.id} for tenant {row.tenant!r} ({row.role.value}); shown once:")
    out.print(key, highlight=False)


@keys_app.command("list")
def apikey_list(as_json: JsonOpt = False) -> None:
    """List keys (never their secrets)."""
    settings = load_settings()

    async def main() -> list[dict[str, Any]]:
        async with open_database(settings) as (db, _), db.session() as session:
            return [
                {
                    "id": str(k.id),
                    "name": k.name,
                    "tenant": k.tenant,
                    "role": k.role.value,
                    "prefix": k.prefix,
                    "created_at": k.created_at.isoformat(),
                    "revoked": k.revoked_at is not None,
                }
                for k in await apikeys.list_keys(session)
            ]

    keys = run_async(main())
    if as_json:
        _print_json(keys)
        return
    table = Table("id", "name", "tenant", "role", "prefix", "created", "revoked")
    for k in keys:
        table.add_row(
            k["id"],
            k["name"],
            k["tenant"],
            k["role"],
            k["prefix"],
            k["created_at"][:19],
            "yes" if k["revoked"] else "",
        )
    out.print(table)


@keys_app.command("revoke")
def apikey_revoke(key_id: str) -> None:
    """Revoke a key; requests with it are refused from now on."""
    settings = load_settings()

    async def main() -> ApiKey | None:
        try:
            ident = uuid.UUID(key_id)
        except ValueError:
            raise CliError(f"not a key id: {key_id!r}") from None
        async with open_database(settings) as (db, _), db.session() as session:
            return await apikeys.revoke_key(session, ident)

    row = run_async(main())
    if row is None:
        raise _fail(f"no key {key_id}")
    out.print(f"key {row.id} revoked")
