"""Test database plumbing: find a PostgreSQL server, build a migrated template, clone it."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import asyncpg

from app.config import normalize_database_url

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
_embedded: Any = None


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def server_url() -> str:
    """The server tests use: TRAWLER_TEST_DATABASE_URL, the local one, else an embedded one."""
    global _embedded
    explicit = os.environ.get("TRAWLER_TEST_DATABASE_URL")
    if explicit:
        return explicit
    if os.environ.get("TRAWLER_TEST_EMBEDDED") != "1" and _reachable("127.0.0.1", 5432):
        return DEFAULT_SERVER
    if _embedded is None:
        import pgserver

        pgdata = Path(tempfile.mkdtemp(prefix="trawler-test-pg-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _embedded = pgserver.get_server(pgdata, cleanup_mode="delete")
    uri: str = _embedded.get_uri()
    return uri


def asyncpg_dsn(url: str) -> str:
    """A URL asyncpg.connect understands (no SQLAlchemy driver suffix)."""
    return normalize_database_url(url).replace("postgresql+asyncpg://", "postgresql://", 1)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    scheme_rest, _, query = url.partition("?")
    base = scheme_rest.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


async def admin_execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
