"""The `trawler` command as a process: migrate, version, and expected failures as one line.

`run_trawler` and `one_line_error` serve the other CLI tests too (test_cli_polish.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from app import __version__
from app.database.migrations import head_revision
from tests import pg
from tests.e2e.conftest import clean_env, trawler_command

pytestmark = pytest.mark.timeout(90)


async def run_trawler(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run `trawler ARGS...` as a process; returns (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *trawler_command(),
        *args,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line_error(stderr: str) -> str:
    """The single `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


async def test_version(tmp_path: Path) -> None:
    code, out, _ = await run_trawler("version", env=clean_env(), cwd=tmp_path)
    assert code == 0
    assert out.strip() == f"trawler {__version__}"


async def test_migrate_reports_old_and_new_revision(tmp_path: Path, fresh_database: str) -> None:
    env = clean_env(TRAWLER_DATABASE_URL=fresh_database, TRAWLER_LOG_LEVEL="WARNING")
    code, out, err = await run_trawler("migrate", env=env, cwd=tmp_path)
    assert code == 0, err
    assert out.startswith(f"<empty> → {head_revision()}"), out

    code, out, err = await run_trawler("migrate", env=env, cwd=tmp_path)
    assert code == 0, err
    assert out.startswith(f"{head_revision()} → {head_revision()}"), out
    assert "already at head" in out

    code, out, err = await run_trawler("migrate", "--json", env=env, cwd=tmp_path)
    assert code == 0, err
    head = head_revision()
    assert json.loads(out) == {"before": head, "after": head, "head": head, "changed": False}


async def test_malformed_database_url_is_one_red_line(tmp_path: Path) -> None:
    env = clean_env(TRAWLER_DATABASE_URL="postgresql://postgres@127.0.0.1:notaport/db")
    code, _, err = await run_trawler("migrate", env=env, cwd=tmp_path)
    assert code == 1
    line = one_line_error(err)
    assert "TRAWLER_DATABASE_URL" in line


async def test_unreachable_database_is_one_red_line(tmp_path: Path) -> None:
    # port 1 on loopback: nothing listens, the connection is refused at once
    env = clean_env(TRAWLER_DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    started = time.perf_counter()
    code, _, err = await run_trawler("migrate", env=env, cwd=tmp_path)
    assert code == 1
    line = one_line_error(err)
    assert "127.0.0.1:1" in line and "refused" in line.lower(), line
    assert time.perf_counter() - started < 30


async def test_unknown_database_is_one_red_line(tmp_path: Path, pg_server: str) -> None:
    missing = pg.with_database(pg_server, pg.unique_name("trawler_missing"))
    code, _, err = await run_trawler(
        "migrate", env=clean_env(TRAWLER_DATABASE_URL=missing), cwd=tmp_path
    )
    assert code == 1
    assert "does not exist" in one_line_error(err)
