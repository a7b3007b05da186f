"""Embedded PostgreSQL (pgserver) in the data directory when no database URL is configured."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A real PostgreSQL server owned by this data directory, reused across restarts.

    pgserver reference-counts users of one data directory across processes (a lock file
    and a pid list), so `trawler serve` and a CLI started beside it share one server, and
    the server stops when the last of them exits.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pgdata").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server; blocking, so call it before the event loop or in a thread."""
        import pgserver

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI)
            warnings.simplefilter("ignore")
            self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        logger.info("embedded PostgreSQL running in %s", self.pgdata)
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
