"""Embedded PostgreSQL (pgserver) in the data directory when no database URL is configured."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)

# pgserver's own list of the processes using one data directory (it stops the server when
# the last of them leaves).
_HANDLES_FILE = ".handle_pids.json"


def _import_pgserver() -> Any:
    # platformdirs warns at import time when XDG_RUNTIME_DIR is unset (root shells, CI):
    # harmless (it falls back to /tmp/runtime-<uid>), so keep it off the user's terminal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server
    return pgserver


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started; the message points at its log."""


class EmbeddedPostgres:
    """A real PostgreSQL server owned by this data directory, reused across restarts.

    pgserver reference-counts users of one data directory across processes (a lock file
    and a pid list), so `trawler serve` and a CLI started beside it share one server, and
    the server stops when the last of them exits. The data survives: the next start
    finds the initialised cluster and only starts it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pgdata").resolve()
        self._server: Any = None

    @property
    def log_file(self) -> Path:
        return self.pgdata / "log"

    def start(self) -> str:
        """Start (or join) the server and return its URL.

        Blocking (initdb, pg_ctl, a file lock): call it before the event loop or through
        asyncio.to_thread.
        """
        pgserver = _import_pgserver()
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._reconcile_handles(pgserver)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        except Exception as error:
            # converted, not swallowed: the caller prints the one-line reason; the
            # traceback stays available at DEBUG, pgserver itself logs the server log
            logger.debug("embedded PostgreSQL failed to start", exc_info=True)
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL failed to start in {self.pgdata} "
                f"({type(error).__name__}); see {self.log_file}"
            ) from error
        uri: str = self._server.get_uri()
        logger.info("embedded PostgreSQL running in %s", self.pgdata)
        return uri

    def stop(self) -> None:
        """Leave the server; it stops when no other process of this data dir still uses it."""
        if self._server is not None:
            server, self._server = self._server, None
            server.cleanup()

    def is_running(self) -> bool:
        """True while a postmaster of this data directory runs (ours or another process's)."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        return _pid_alive(pid)

    def _reconcile_handles(self, pgserver: Any) -> None:
        """Make pgserver's bookkeeping true again before joining the server.

        - Processes that died without leaving (SIGKILL, OOM) stay in pgserver's pid list;
          their entries would keep the count above zero forever, so the last live user
          would never stop the server. Drop them.
        - pgserver caches one server object per data dir and process. When this process
          left while others still used the server, the cached object outlives its
          registration, and joining again through it would not count us. Forget it.
        """
        server_cls = pgserver.postgres_server.PostgresServer
        handles = self.pgdata / _HANDLES_FILE
        with server_cls._lock:
            pids: list[int] = []
            if handles.exists():
                try:
                    pids = [int(p) for p in json.loads(handles.read_text())]
                except (OSError, ValueError, TypeError):
                    logger.warning("unreadable %s; starting a fresh handle list", handles)
                    handles.write_text("[]")
            alive = [p for p in pids if p == os.getpid() or _pid_alive(p)]
            if alive != pids:
                logger.info("forgetting dead embedded-PostgreSQL users %s", set(pids) - set(alive))
                handles.write_text(json.dumps(alive))
            stale = server_cls._instances.get(self.pgdata)
            if stale is not None and os.getpid() not in alive:
                atexit.unregister(stale._cleanup)
                del server_cls._instances[self.pgdata]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # exists, owned by another user (the postmaster runs as `pgserver` under root)
        return True
    return True


async def resolve_database_url(settings: Settings) -> tuple[Settings, EmbeddedPostgres | None]:
    """With no URL configured, start the embedded PostgreSQL and point the settings at it."""
    if settings.database_url is not None:
        return settings, None
    from app.config import Settings

    embedded = EmbeddedPostgres(settings.data_dir)
    # pgserver spawns and waits on subprocesses: keep that off the event loop
    url = await asyncio.to_thread(embedded.start)
    resolved = settings.model_copy(update={"database_url": Settings(database_url=url).database_url})
    return resolved, embedded
