"""Process logging: plain text for people, JSON lines (TRAWLER_LOG_FORMAT=json) for collectors.

Context fields: `request_id` (set per HTTP request by the request middleware), `job_id` and
`worker_id` (set by the code working for a job or inside a worker) live in context
variables; every record logged while they are set carries them, so a JSON line can be
traced to its request, job and worker without passing them to each log call. asyncio
tasks copy the context they are created in: set `worker_id` before a worker starts its
loops and every line of those loops has it.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

request_id_var: ContextVar[str | None] = ContextVar("trawler_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("trawler_job_id", default=None)
worker_id_var: ContextVar[str | None] = ContextVar("trawler_worker_id", default=None)

_CONTEXT_FIELDS: tuple[tuple[str, ContextVar[str | None]], ...] = (
    ("request_id", request_id_var),
    ("job_id", job_id_var),
    ("worker_id", worker_id_var),
)


def _text(value: str | uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


@contextmanager
def log_context(
    *,
    request_id: str | uuid.UUID | None = None,
    job_id: str | uuid.UUID | None = None,
    worker_id: str | uuid.UUID | None = None,
) -> Iterator[None]:
    """Set the given context fields for the block (the others keep their values)."""
    values = {"request_id": request_id, "job_id": job_id, "worker_id": worker_id}
    tokens = [
        (var, var.set(_text(values[name])))
        for name, var in _CONTEXT_FIELDS
        if values[name] is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def bind_worker(worker_id: str | uuid.UUID) -> None:
    """Set `worker_id` for the rest of the current task and every task it creates."""
    worker_id_var.set(_text(worker_id))


class ContextFilter(logging.Filter):
    """Copies the context fields onto each record (an explicit `extra=` value wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT_FIELDS:
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


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
    handler.addFilter(ContextFilter())
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
