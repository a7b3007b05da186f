"""`trawler serve` as a real process: external PostgreSQL, then the embedded one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from app.database.embedded import EmbeddedPostgres
from app.database.migrations import head_revision
from tests.e2e.conftest import clean_env, trawler_command
from tests.support.workers import Served, serve_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def _check_running_service(served: Served) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as client:
        await served.wait_ready(client)
        live = await client.get(f"{served.base_url}/health/live")
        assert live.status_code == 200
        details = await client.get(f"{served.base_url}/health")
    assert details.status_code == 200, details.text
    body: dict[str, object] = details.json()
    assert body["status"] in {"ok", "degraded"}, body
    pool = body["pool"]
    assert isinstance(pool, dict)
    for key in ("size", "checked_out", "overflow", "checkouts", "timeouts", "invalidations"):
        assert key in pool, key
    assert pool["checkouts"] >= 1
    assert set(pool["wait_ms"]) == {"p50", "p99", "max"}
    assert body["migrations"] == {"head": head_revision(), "current": head_revision()}
    return body


async def test_serve_on_external_database(tmp_path: Path, fresh_database: str) -> None:
    env = clean_env(
        TRAWLER_DATABASE_URL=fresh_database,
        TRAWLER_DATA_DIR=str(tmp_path / "data"),
    )
    async with serve_process(tmp_path, env) as served:
        await _check_running_service(served)
        code = await served.terminate()
        assert code == 0, f"exit status {code}:\n{served.output()}"
    assert not (tmp_path / "data" / "pgdata").exists()  # a URL given: no embedded server


async def test_serve_on_embedded_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = clean_env(TRAWLER_DATA_DIR=str(data_dir), TRAWLER_LOG_FORMAT="json")
    embedded = EmbeddedPostgres(data_dir)
    try:
        async with serve_process(tmp_path, env) as served:
            await _check_running_service(served)
            assert embedded.is_running()
            # a CLI run beside it joins the same server and leaves it running
            cli = await asyncio.create_subprocess_exec(
                *trawler_command(),
                "migrate",
                env=env,
                cwd=tmp_path,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(cli.communicate(), 60)
            assert cli.returncode == 0, err.decode()
            assert "already at head" in out.decode()
            assert embedded.is_running()
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await client.get(f"{served.base_url}/health/ready")).status_code == 200
            code = await served.terminate()
            assert code == 0, f"exit status {code}:\n{served.output()}"
            log = served.log.read_text()
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        assert not embedded.is_running(), "the embedded server outlived `trawler serve`"
        # TRAWLER_LOG_FORMAT=json: every line is one JSON object with the fixed keys
        lines = [line for line in log.splitlines() if line.strip()]
        assert lines
        for line in lines:
            record = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= set(record), line
        assert any(json.loads(line)["logger"] == "uvicorn.access" for line in lines)
    finally:
        if embedded.is_running():  # a failed assertion must not leave a postmaster behind
            pid = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGINT)
