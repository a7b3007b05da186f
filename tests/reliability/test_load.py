"""Scenario 5 (the suite's size): job submissions from 64 concurrent clients over real HTTP.

`trawler serve --no-worker` as a process; 64 clients (one API key each, one keep-alive
connection each) send 1,000 POST /api/v1/scrape between them. bench/reliability/load.py
runs the full 5,000 and records p50/p99 in docs/RELIABILITY.md.

Promise: no 5xx and no dropped request; every 202 is a committed job (counted in the
database by id), and nothing else was committed.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.database.connection import ConnectionManager
from tests.e2e.conftest import clean_env
from tests.integration.conftest import make_key
from tests.support.jobs import scalar
from tests.support.load import submit_load
from tests.support.workers import serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CLIENTS = 64
SUBMISSIONS = 1_000


async def test_submissions_from_64_clients_are_all_committed(
    tmp_path: Path, db_url: str, db: ConnectionManager
) -> None:
    keys = [await make_key(db, f"load-{n}") for n in range(CLIENTS)]
    env = clean_env(
        TRAWLER_DATABASE_URL=db_url,
        TRAWLER_DATA_DIR=str(tmp_path / "data"),
        TRAWLER_LOG_LEVEL="WARNING",
    )
    async with serve_process(tmp_path, env, "--no-worker") as served:
        async with httpx.AsyncClient(timeout=10) as probe:
            await served.wait_ready(probe)
        result = await submit_load(
            served.base_url, keys, SUBMISSIONS, target="http://example.com/load/"
        )
        code = await served.terminate()
        assert code == 0, served.output()

    print(f"\n[load, {CLIENTS} clients] {result.summary()}")
    assert result.failures == [], result.failures[:5]
    assert not [s for s in result.statuses if s >= 500], result.statuses
    assert result.statuses == {202: SUBMISSIONS}, result.statuses
    assert len(set(result.accepted)) == SUBMISSIONS
    committed = await scalar(
        db, "SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))", ids=result.accepted
    )
    assert committed == SUBMISSIONS, "a 202 without its job"
    assert await scalar(db, "SELECT count(*) FROM jobs") == SUBMISSIONS
    assert await scalar(db, "SELECT count(*) FROM tasks") == SUBMISSIONS
