"""The `trawler` console script: serve, migrate, version (and the shared CLI plumbing).

Adding a command: write a function decorated with `@app.command()` (or a sub-app with
`app.add_typer(group, name="jobs")`), load settings with `load_settings()`, and run its
coroutine with `run_async()`; inside, `async with open_database(settings) as (db, _):`
gives a connected ConnectionManager on the configured or embedded PostgreSQL.
Expected failures raise `CliError` (or a database outage error) and become one red line
and exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import make_url

from app import __version__
from app.config import Settings, get_settings
from app.database.connection import ConnectionManager, DatabaseUnavailable, is_unavailable
from app.database.embedded import EmbeddedPostgres, EmbeddedPostgresError
from app.database.migrations import current_revision, head_revision, upgrade_to_head
from app.logging import configure_logging
from app.main import LifespanHook, create_app, migrate_with_retry, resolve_database_url

logger = logging.getLogger("trawler.cli")

T = TypeVar("T")

app = typer.Typer(
    name="trawler",
    help="Trawler: a PostgreSQL-native scraping job backend.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


class CliError(Exception):
    """An expected failure: printed as one red line, exit status 1, no traceback."""


# --------------------------------------------------------------------------- plumbing


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (TRAWLER_*), plus command-line overrides; logging set up."""
    try:
        settings = get_settings()
    except ValidationError as error:
        problems = "; ".join(
            f"TRAWLER_{'_'.join(str(p) for p in e['loc']).upper()}: "
            + str(e["msg"]).removeprefix("Value error, ")
            for e in error.errors()
        )
        raise _fail(f"invalid settings: {problems}") from None
    values = {key: value for key, value in overrides.items() if value is not None}
    if values:
        settings = settings.model_copy(update=values)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on a fresh loop (uvloop when installed).

    Expected failures (CliError, database outage, embedded server failure) become a
    one-line error and exit status 1.
    """
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(coro)
    except (CliError, EmbeddedPostgresError, DatabaseUnavailable) as error:
        raise _fail(str(error)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as error:
        if is_unavailable(error):
            raise _fail(f"database unavailable: {_short(error)}") from None
        raise


def describe_database(db: ConnectionManager, embedded: EmbeddedPostgres | None) -> str:
    if embedded is not None:
        return f"embedded PostgreSQL in {embedded.pgdata}"
    return make_url(db.url).render_as_string(hide_password=True)


@asynccontextmanager
async def open_database(
    settings: Settings,
    *,
    application_name: str = "trawler-cli",
    wait_s: float = 0.0,
) -> AsyncIterator[tuple[ConnectionManager, EmbeddedPostgres | None]]:
    """Connect to TRAWLER_DATABASE_URL, or start/join the embedded server in DATA_DIR.

    Yields a ConnectionManager whose database answered a probe (retried for `wait_s`
    seconds while the server is unreachable), and the embedded server handle or None.
    Leaving disposes the engine and leaves the embedded server (which stops when its last
    user has gone).
    """
    resolved, embedded = await resolve_database_url(settings)
    try:
        db = ConnectionManager(resolved, application_name=application_name)
        try:
            await _wait_reachable(db, describe_database(db, embedded), wait_s)
            yield db, embedded
        finally:
            await db.dispose()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _wait_reachable(db: ConnectionManager, where: str, wait_s: float) -> None:
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


def _short(error: BaseException) -> str:
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


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
    signals = _ServeSignals()
    with signals.installed():
        async with open_database(settings, application_name="trawler-api", wait_s=15.0) as (
            db,
            embedded,
        ):
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


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address [TRAWLER_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [TRAWLER_PORT]", min=1, max=65535)] = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="API only; run `trawler worker` elsewhere")
    ] = False,
) -> None:
    """Serve the API (and the executor) on the configured or embedded PostgreSQL."""
    settings = load_settings(host=host, port=port)
    try:
        run_async(serve_app(settings, run_worker=not no_worker))
    except asyncio.CancelledError:
        # a signal arrived before the server was up: everything was left cleanly
        err.print("stopped before serving")


# --------------------------------------------------------------------------- migrate


async def _migrate(settings: Settings) -> tuple[str | None, str | None]:
    async with open_database(settings, application_name="trawler-migrate") as (db, _):
        before = await current_revision(db.engine)
        after = await upgrade_to_head(db.engine)
    return before, after


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision."""
    settings = load_settings()
    before, after = run_async(_migrate(settings))
    note = "already at head" if before == after else "migrated"
    out.print(f"{before or '<empty>'} → {after}  ({note}; head is {head_revision()})")


# --------------------------------------------------------------------------- version


@app.command()
def version() -> None:
    """Print the Trawler version."""
    out.print(f"trawler {__version__}")


def main() -> None:
    # the other commands live in app.commands, which imports this module
    importlib.import_module("app.commands")
    app()


if __name__ == "__main__":
    main()
