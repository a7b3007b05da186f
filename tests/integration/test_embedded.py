"""Embedded PostgreSQL (pgserver): start in a data dir, migrate, stop, start again on the data.

Not marked slow on purpose: it is the zero-setup path `trawler serve` takes, so CI runs it
(a start takes ~1-2 s; the first one also runs initdb).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.config import Settings
from app.database.embedded import EmbeddedPostgres
from app.database.migrations import current_revision, head_revision, upgrade_to_head

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_server_left_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing assertion interrupted, the test's postmaster does not outlive it."""
    yield
    pid_file = tmp_path / "pgdata" / "postmaster.pid"
    if EmbeddedPostgres(tmp_path).is_running():
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)  # fast shutdown


def _asyncpg_url(uri: str) -> str:
    url = Settings(database_url=uri).database_url
    assert url is not None
    return url


async def _start(server: EmbeddedPostgres) -> str:
    # blocking (initdb, pg_ctl): off the event loop, as the app does it
    return _asyncpg_url(await asyncio.to_thread(server.start))


async def test_embedded_start_migrate_stop_and_reuse(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path)
    url = await _start(server)
    try:
        assert server.is_running()
        engine = create_async_engine(url)
        try:
            assert await upgrade_to_head(engine) == head_revision()
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO workers (id, hostname, pid, concurrency, version)"
                        " VALUES (gen_random_uuid(), 'kept-across-restarts', 1, 1, 't')"
                    )
                )
                version = await conn.scalar(text("SHOW server_version"))
            assert str(version).split(".")[0].isdigit()
        finally:
            await engine.dispose()
    finally:
        await asyncio.to_thread(server.stop)
    assert not server.is_running()  # the last user left: the server stopped

    again = EmbeddedPostgres(tmp_path)
    url = await _start(again)
    try:
        engine = create_async_engine(url)
        try:
            # same data directory: schema and rows survived the restart, no initdb again
            assert await current_revision(engine) == head_revision()
            async with engine.connect() as conn:
                count = await conn.scalar(
                    text("SELECT count(*) FROM workers WHERE hostname = 'kept-across-restarts'")
                )
            assert count == 1
        finally:
            await engine.dispose()
    finally:
        await asyncio.to_thread(again.stop)
    assert not again.is_running()


async def test_dead_users_do_not_keep_the_server_running(tmp_path: Path) -> None:
    """A user killed with SIGKILL never deregisters; the next start forgets it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that surely is gone
    dead.wait()
    server = EmbeddedPostgres(tmp_path)
    await _start(server)
    handles = server.pgdata / ".handle_pids.json"
    try:
        # as a SIGKILLed `trawler serve` would leave it
        handles.write_text(json.dumps([dead.pid, os.getpid()]))
    finally:
        await asyncio.to_thread(server.stop)
    assert server.is_running()  # pgserver alone still counts the dead user

    await _start(server)  # joins the running server and drops the dead pid
    assert json.loads(handles.read_text()) == [os.getpid()]
    await asyncio.to_thread(server.stop)
    assert not server.is_running()
