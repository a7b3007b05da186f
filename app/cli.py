"""The `trawler` console script: serve, migrate, version, and the shared CLI plumbing.

Adding a command: write a function decorated with `@app.command(rich_help_panel=...)` (or
a sub-app with `app.add_typer(group, name="jobs")`) whose docstring starts with a one-line
summary (`trawler --help` lists it), load settings with `load_settings()`, and run its
coroutine with `run_async()`; inside, `async with open_database(settings) as (db, _):`
gives a connected ConnectionManager on the configured or embedded PostgreSQL, its schema
checked. Results go to stdout (`print_json` when `--json` is given: nothing else may reach
stdout then); progress and notes go to stderr.

Expected failures raise `CliError` (or a domain error, a database outage, a usage error)
and become one red line on stderr and a non-zero exit status, handled in one place
(`main`); anything else is a bug and keeps its traceback.

Imports of the service, database and web layers happen inside the functions that need
them, so that `trawler --help`, `trawler version` and usage errors answer at once, and so
that `trawler worker` never loads the web stack (FastAPI, Starlette, uvicorn) nor rich,
which it does not use (tests/unit/test_worker_imports.py checks it). `out` and `err` are
rich Consoles made on first use; hand `real_console(out)` to rich's own classes.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Annotated, Any, Self, TypeVar, cast

import orjson
import typer

from app import __version__
from app.config import Settings, get_settings

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from app.database.connection import ConnectionManager
    from app.database.embedded import EmbeddedPostgres
    from app.main import LifespanHook

logger = logging.getLogger("trawler.cli")

T = TypeVar("T")

SERVICE_PANEL = "Run the service"
WORK_PANEL = "Jobs and results"
ADMIN_PANEL = "Administration"

app = typer.Typer(
    name="trawler",
    help="Trawler: a PostgreSQL-native scraping job backend.",
    epilog=(
        "Settings come from TRAWLER_* environment variables; with no TRAWLER_DATABASE_URL "
        "every command uses the embedded PostgreSQL in TRAWLER_DATA_DIR. "
        "Read commands take --json (JSON alone on standard output). "
        "`trawler COMMAND --help` tells more."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """A rich Console made on first use (rich costs ~50 ms and a few MB to import)."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def resolve(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never recurse before __init__ ran (copy, pickle)
            raise AttributeError(name)
        return getattr(self.resolve(), name)


def real_console(console: Console) -> Console:
    """The Console itself behind `out` or `err`: what rich's own classes must be given
    (`with console:` and attribute writes do not go through a proxy)."""
    return console.resolve() if isinstance(console, _LazyConsole) else console


# typed as the Console they stand for: every use goes through __getattr__
out = cast("Console", _LazyConsole(soft_wrap=True))
err = cast("Console", _LazyConsole(stderr=True, soft_wrap=True))

JsonOpt = Annotated[
    bool, typer.Option("--json", help="print JSON only (machine-readable) on standard output")
]

# typer >= 0.22 vendors click as typer._click, older releases use click itself; either way
# the module defining typer.BadParameter holds the whole exception hierarchy.
_click_exceptions = sys.modules[typer.BadParameter.__module__]
_ClickException: type[Exception] = _click_exceptions.ClickException
_UsageError: type[Exception] = _click_exceptions.UsageError


class CliError(Exception):
    """An expected failure: printed as one red line, exit status 1, no traceback."""


# --------------------------------------------------------------------------- output


def print_json(value: Any) -> None:
    """Write `value` as JSON on stdout: plain bytes (no colour, whatever the terminal)."""
    data = orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2)
    sys.stdout.write(data.decode() + "\n")
    sys.stdout.flush()


def print_error(message: str) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def duration(seconds: float) -> str:
    """1.3s, 42s, 3m05s, 2h07m."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class ProgressDisplay:
    """Progress of one piece of work on stderr, never on stdout.

    On an interactive terminal: a live rich bar with done/total, rate, ETA and elapsed
    time. Anywhere else (a pipe, a log file, TERM=dumb): plain lines, one when the status
    changes and at most one every `every` seconds, then a final one; no cursor movement
    and no colour codes end up in logs. The rate is measured over the last `window`
    seconds, so the ETA follows the current pace.
    """

    def __init__(
        self,
        unit: str,
        *,
        console: Console | None = None,
        every: float = 5.0,
        window: float = 10.0,
    ) -> None:
        self.unit = unit
        self.console = console or err
        self.live = self.console.is_interactive
        self.every = every
        self.window = window
        self.started = time.monotonic()
        self.status = ""
        self.done = 0
        self.total: int | None = None
        self.extra = ""
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._printed_at = 0.0
        self._printed: tuple[str, int, int | None] | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._moved: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __enter__(self) -> Self:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TextColumn("{task.fields[rate]} {task.fields[unit]}/s  ETA {task.fields[eta]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[extra]}"),
                console=real_console(self.console),
                transient=False,
                redirect_stdout=False,  # stdout carries results (and export data), never this
            )
            original = sys.stderr
            self._progress.start()
            # log records (an in-process executor's, say) print above the bar instead of
            # through it: point the stderr log handlers at the proxy the bar installed
            self._moved = [
                (handler, original)
                for handler in logging.getLogger().handlers
                if isinstance(handler, logging.StreamHandler) and handler.stream is original
            ]
            for handler, _ in self._moved:
                handler.setStream(sys.stderr)
            self._task = self._progress.add_task(
                "starting", total=None, rate="0.0", unit=self.unit, eta="-", extra=""
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._draw()  # the final state, even if its update came within a tenth
            for handler, stream in self._moved:
                handler.setStream(stream)
            self._progress.stop()
        elif exc_type is None and self._printed != (self.status, self.done, self.total):
            self._line()  # the final state, unless the last line said it already

    def rate(self) -> float:
        """Units per second over the last `window` seconds (since the start, at first)."""
        now_t, now_done = self._samples[-1]
        then_t, then_done = self._samples[0]
        if now_t - then_t < 1.0:
            then_t, then_done = self.started, 0
        elapsed = now_t - then_t
        return (now_done - then_done) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> str:
        rate = self.rate()
        if self.total is None or rate <= 0 or self.done >= self.total:
            return "-"
        return duration((self.total - self.done) / rate)

    def update(self, status: str, done: int, total: int | None, extra: str = "") -> None:
        now = time.monotonic()
        changed = status != self.status
        self.status, self.done, self.total, self.extra = status, done, total, extra
        if not changed and now - self._samples[-1][0] < 0.1:
            return  # ten refreshes a second are plenty (export reports every chunk)
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        if self._progress is not None:
            self._draw()
        elif self._printed is None or changed or now - self._printed_at >= self.every:
            self._line()

    def _draw(self) -> None:
        assert self._progress is not None
        assert self._task is not None
        self._progress.update(
            self._task,
            description=self.status,
            completed=self.done,
            total=self.total,
            rate=f"{self.rate():.1f}",
            eta=self.eta(),
            extra=self.extra,
        )

    def _line(self) -> None:
        self._printed_at = time.monotonic()
        self._printed = (self.status, self.done, self.total)
        total = "?" if self.total is None else str(self.total)
        parts = [
            f"{self.status}: {self.done}/{total} {self.unit}",
            f"{self.rate():.1f} {self.unit}/s",
            f"ETA {self.eta()}",
            f"elapsed {duration(time.monotonic() - self.started)}",
        ]
        if self.extra:
            parts.append(self.extra)
        self.console.print(", ".join(parts), markup=False, highlight=False)


# --------------------------------------------------------------------------- plumbing


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (TRAWLER_*), plus command-line overrides; logging set up."""
    from pydantic import ValidationError

    from app.logging import configure_logging

    try:
        settings = get_settings()
    except ValidationError as error:
        problems = "; ".join(
            f"TRAWLER_{'_'.join(str(p) for p in e['loc']).upper()}: "
            + str(e["msg"]).removeprefix("Value error, ")
            for e in error.errors()
        )
        raise CliError(f"invalid settings: {problems}") from None
    values = {key: value for key, value in overrides.items() if value is not None}
    if values:
        settings = settings.model_copy(update=values)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on a fresh loop (uvloop when installed).

    Its expected failures propagate to `main`, which prints them as one line.
    """
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def describe_database(db: ConnectionManager, embedded: EmbeddedPostgres | None) -> str:
    from sqlalchemy.engine import make_url

    if embedded is not None:
        return f"embedded PostgreSQL in {embedded.pgdata}"
    return make_url(db.url).render_as_string(hide_password=True)


@asynccontextmanager
async def open_database(
    settings: Settings,
    *,
    application_name: str = "trawler-cli",
    wait_s: float = 0.0,
    schema: bool = True,
) -> AsyncIterator[tuple[ConnectionManager, EmbeddedPostgres | None]]:
    """Connect to TRAWLER_DATABASE_URL, or start/join the embedded server in DATA_DIR.

    Yields a ConnectionManager whose database answered a probe (retried for `wait_s`
    seconds while the server is unreachable), and the embedded server handle or None.
    With `schema` (the one-shot commands; serve and migrate migrate, a worker trusts the
    service to), the schema must be there: the embedded database is migrated on the spot
    (it is ours), a configured one that is empty or behind is refused with a hint to
    `trawler migrate` (a TRAWLER_DATABASE_URL naming the wrong database must not get
    tables created in it).
    Leaving disposes the engine and leaves the embedded server (which stops when its last
    user has gone).
    """
    from app.database.connection import ConnectionManager
    from app.database.embedded import resolve_database_url

    resolved, embedded = await resolve_database_url(settings)
    try:
        db = ConnectionManager(resolved, application_name=application_name)
        try:
            where = describe_database(db, embedded)
            await _wait_reachable(db, where, wait_s)
            if schema:
                await _check_schema(db, where, migrate=embedded is not None)
            yield db, embedded
        finally:
            await db.dispose()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _wait_reachable(db: ConnectionManager, where: str, wait_s: float) -> None:
    from app.database.connection import DatabaseUnavailable, is_unavailable

    deadline = time.monotonic() + wait_s
    while True:
        try:
            await db.health_check(limit=db.settings.db_connect_timeout + 1.0)
            return
        except DatabaseUnavailable as error:
            cause = error.__cause__
            retryable = cause is None or is_unavailable(cause)
            if not retryable or time.monotonic() >= deadline:
                reason = _short(cause) if cause is not None else str(error)
                raise CliError(f"cannot use the database {where}: {reason}") from None
            logger.warning("database %s not reachable yet (%s); retrying", where, error)
            await asyncio.sleep(1.0)


async def _check_schema(db: ConnectionManager, where: str, *, migrate: bool) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from app.database.migrations import (
        alembic_config,
        current_revision,
        head_revision,
        upgrade_to_head,
    )

    current, head = await current_revision(db.engine), head_revision()
    if current == head:
        return
    if current is not None:
        try:
            ScriptDirectory.from_config(alembic_config()).get_revision(current)
        except CommandError:
            # written by a newer trawler: migrations expand before they contract, so
            # this one still works with it (a rolling upgrade runs both at once), except
            # across the revisions docs/OPERATIONS.md lists under "Upgrading"
            return
    if migrate:
        await upgrade_to_head(db.engine)
        return
    state = "has no Trawler schema" if current is None else f"is at schema {current}"
    raise CliError(
        f"the database {where} {state}, this trawler needs {head}: run `trawler migrate`"
    )


def _short(error: BaseException) -> str:
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def expected_failure(error: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (traceback kept)."""
    if isinstance(error, CliError):
        return str(error)
    # imported only now: these modules are heavy, and loaded already if they raised
    from app.database.connection import DatabaseUnavailable, is_unavailable
    from app.database.embedded import EmbeddedPostgresError
    from app.errors import TrawlerError

    if isinstance(error, DatabaseUnavailable | EmbeddedPostgresError):
        return str(error)
    # a domain refusal (not found, conflict, bad input, quota); a bare 500 is a bug
    if isinstance(error, TrawlerError) and error.status != 500:
        return error.detail
    if is_unavailable(error):
        return f"database unavailable: {_short(error)}"
    return None


def _usage_message(error: Exception) -> str:
    message = str(getattr(error, "format_message", lambda: str(error))())
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message


# --------------------------------------------------------------------------- serve


def worker_hooks(settings: Settings) -> list[LifespanHook]:
    """Lifespan hooks that run the executor inside `trawler serve` (skipped by --no-worker).

    Each hook starts an AsyncJobExecutor after the database is ready and returns the
    coroutine function that drains it on shutdown.
    """
    from app.utils.runner import executor_hook

    return [executor_hook(settings)]


class _ServeSignals:
    """SIGINT/SIGTERM around `serve`.

    Before uvicorn runs, a signal cancels start-up (the embedded server is still left
    cleanly). While it runs, uvicorn's own handlers shut it down gracefully and, on the
    way out, re-raise the signal to the previous handler; that is this one, which then
    does nothing, so the process lives on to stop the embedded database and exit 0.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: list[int] = []
        self.serving = False
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received.append(signum)
        if not self.serving and self._task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        previous = {sig: signal.signal(sig, self._handle) for sig in self._SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def serve_app(settings: Settings, *, run_worker: bool = True) -> None:
    """Start/join the database, migrate, then serve the API (and executor) until a signal."""
    import uvicorn

    from app.main import create_app, migrate_with_retry

    signals = _ServeSignals()
    with signals.installed():
        async with open_database(
            settings, application_name="trawler-api", wait_s=15.0, schema=False
        ) as (db, embedded):
            await migrate_with_retry(db, attempts=3)
            await _announce_admin_key(db)
            hooks = worker_hooks(db.settings) if run_worker else []
            application = create_app(migrate=False, hooks=hooks, db=db)
            application.state.run_worker = run_worker
            application.state.embedded = embedded
            config = uvicorn.Config(
                application,
                host=db.settings.host,
                port=db.settings.port,
                lifespan="on",
                log_config=None,  # our handlers (text or JSON) format uvicorn's records too
                log_level=db.settings.log_level.lower(),
                timeout_graceful_shutdown=max(1, round(db.settings.shutdown_grace)),
            )
            server = uvicorn.Server(config)
            logger.info(
                "trawler %s: database %s, worker %s",
                __version__,
                describe_database(db, embedded),
                "on" if run_worker else "off (--no-worker)",
            )
            signals.serving = True
            await server.serve()
            if not server.started:
                raise CliError(f"the server did not start on {db.settings.host}:{db.settings.port}")


async def _announce_admin_key(db: ConnectionManager) -> None:
    from app.commands import ADMIN_KEY_FILE, ensure_admin_key

    key = await ensure_admin_key(db, db.settings.data_dir)
    if key is not None:
        # through logging, so TRAWLER_LOG_FORMAT=json keeps every console line JSON
        logger.warning(
            "first start: created an admin API key (shown once; saved to %s, mode 0600): %s",
            db.settings.data_dir / ADMIN_KEY_FILE,
            key,
        )


@app.command(rich_help_panel=SERVICE_PANEL)
def serve(
    host: Annotated[str | None, typer.Option(help="bind address [TRAWLER_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [TRAWLER_PORT]", min=1, max=65535)] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="API only; run `trawler worker` elsewhere")
    ] = False,
) -> None:
    """Serve the API (and the executor) on the configured or embedded PostgreSQL.

    Migrates the schema first. On the first start with no API keys, creates an admin key,
    logs it once and saves it to TRAWLER_DATA_DIR/admin.key. SIGTERM drains gracefully.
    """
    settings = load_settings(host=host, port=port)
    try:
        run_async(serve_app(settings, run_worker=not no_worker))
    except asyncio.CancelledError:
        # a signal arrived before the server was up: everything was left cleanly
        err.print("stopped before serving")


# --------------------------------------------------------------------------- migrate


async def _migrate(settings: Settings) -> tuple[str | None, str | None]:
    from app.database.migrations import current_revision, upgrade_to_head

    async with open_database(settings, application_name="trawler-migrate", schema=False) as (
        db,
        _,
    ):
        before = await current_revision(db.engine)
        after = await upgrade_to_head(db.engine)
    return before, after


@app.command(rich_help_panel=SERVICE_PANEL)
def migrate(as_json: JsonOpt = False) -> None:
    """Upgrade the database schema to the newest revision."""
    from app.database.migrations import head_revision

    settings = load_settings()
    before, after = run_async(_migrate(settings))
    if as_json:
        print_json(
            {"before": before, "after": after, "head": head_revision(), "changed": before != after}
        )
        return
    note = "already at head" if before == after else "migrated"
    out.print(f"{before or '<empty>'} → {after}  ({note}; head is {head_revision()})")


# --------------------------------------------------------------------------- version


@app.command(rich_help_panel=ADMIN_PANEL)
def version(as_json: JsonOpt = False) -> None:
    """Print the Trawler version."""
    if as_json:
        print_json(
            {
                "name": "trawler",
                "version": __version__,
                "python": ".".join(str(n) for n in sys.version_info[:3]),
            }
        )
        return
    out.print(f"trawler {__version__}", highlight=False)


# --------------------------------------------------------------------------- entry point


def main(args: list[str] | None = None) -> None:
    """The `trawler` console script: every command's expected failures end here as one
    red line on stderr and a non-zero exit status (1; 2 for usage errors; 130 for ^C)."""
    # the other commands live in app.commands, which imports this module
    importlib.import_module("app.commands")
    command = typer.main.get_command(app)
    code: Any
    try:
        code = command.main(args=args, prog_name="trawler", standalone_mode=False)
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow", highlight=False)
        code = 130
    except typer.Abort:
        err.print("aborted", style="yellow", highlight=False)
        code = 1
    except _ClickException as error:
        # bare `trawler` (or `trawler jobs`) printed the help already
        if type(error).__name__ != "NoArgsIsHelpError":
            print_error(_usage_message(error) if isinstance(error, _UsageError) else str(error))
        code = getattr(error, "exit_code", 1)
    except Exception as error:
        if isinstance(error, OSError) and error.errno == errno.EPIPE:
            # `trawler jobs list | head -1`: the reader left; write nothing more anywhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        message = expected_failure(error)
        if message is None:
            raise
        print_error(message)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    # `python -m app.cli`: run the importable module's main, the one app.commands extends
    # (this file's copy as __main__ has neither those commands nor the same CliError)
    importlib.import_module("app.cli").main()
