"""Process logging: plain text for people, JSON lines (TRAWLER_LOG_FORMAT=json) for collectors."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted.
_RESERVED = frozenset(
    {
        *vars(logging.LogRecord("", 0, "", 0, "", None, None)),
        "message",
        "asctime",
        "taskName",
        # uvicorn attaches an ANSI-coloured copy of its messages; JSON consumers don't want it
        "color_message",
    }
)

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TrawlerHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so configuring twice replaces it."""


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Install one stderr handler on the root logger; every library logger propagates to it."""
    handler = _TrawlerHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _TrawlerHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's loggers have no handlers of their own when it gets log_config=None: they
    # propagate here. SQLAlchemy's engine logger would echo every statement at INFO.
    # Chatty libraries stay at WARNING: SQLAlchemy's engine would echo every statement,
    # its pool (logger named after our MonitoredPool) every dispose, pgserver every
    # command line it runs, alembic its context set-up (we log the migration ourselves).
    for name in (
        "sqlalchemy.engine",
        "sqlalchemy.pool",
        "app.database.connection.MonitoredPool",
        "pgserver",
        "alembic",
    ):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # warnings.warn() output goes through logging too (JSON stays parseable)
    logging.captureWarnings(True)
