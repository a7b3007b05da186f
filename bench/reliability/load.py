"""Reliability scenario 5 at full size: 5,000 job submissions from 64 concurrent clients.

    python bench/reliability/load.py                      # 5,000 submissions, 64 clients
    python bench/reliability/load.py --submissions 20000 --rounds 3 --json out.json

Starts `trawler serve --no-worker` (one process, default settings) on a database of its own
(created on the PostgreSQL that the tests use, migrated, dropped at the end), creates one API
key per client (64 tenants), sends the submissions over real HTTP (aiohttp, one keep-alive
connection per client), then counts the jobs in the database by id: every 202 must be a
committed job, and nothing else may have been committed. Exit status 1 if any check fails.
Results are recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402

import httpx  # noqa: E402
from sqlalchemy import text  # noqa: E402

from app.config import Settings  # noqa: E402
from app.database.connection import ConnectionManager  # noqa: E402
from app.database.migrations import upgrade_to_head  # noqa: E402
from app.services import apikeys  # noqa: E402
from tests import pg  # noqa: E402
from tests.e2e.conftest import clean_env  # noqa: E402
from tests.support.load import LoadResult, submit_load  # noqa: E402
from tests.support.workers import serve_process  # noqa: E402


async def _keys(db: ConnectionManager, n: int) -> list[str]:
    keys = []
    async with db.session() as session:
        for i in range(n):
            _, key = await apikeys.create_key(session, f"load-{i}", tenant=f"load-{i}")
            keys.append(key)
    return keys


async def _committed(db: ConnectionManager, result: LoadResult) -> tuple[int, int]:
    async with db.connect() as conn:
        by_id = (
            await conn.execute(
                text("SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"),
                {"ids": result.accepted},
            )
        ).scalar_one()
        total = (await conn.execute(text("SELECT count(*) FROM jobs"))).scalar_one()
    return int(by_id), int(total)


async def run(args: argparse.Namespace) -> int:
    server = args.database_url or pg.server_url()
    name = pg.unique_name("trawler_bench_load")
    await pg.admin_execute(server, f'CREATE DATABASE "{name}"')
    url = pg.with_database(server, name)
    db = ConnectionManager(Settings(database_url=url), application_name="trawler-bench")
    failed = False
    report: list[dict[str, object]] = []
    try:
        await upgrade_to_head(db.engine)
        keys = await _keys(db, args.clients)
        with tempfile.TemporaryDirectory(prefix="trawler-bench-load-") as tmp:
            env = clean_env(
                TRAWLER_DATABASE_URL=url,
                TRAWLER_DATA_DIR=str(Path(tmp) / "data"),
                TRAWLER_LOG_LEVEL="WARNING",
            )
            async with serve_process(Path(tmp), env, "--no-worker") as served:
                async with httpx.AsyncClient(timeout=10) as probe:
                    await served.wait_ready(probe)
                committed_before = 0
                for round_no in range(1, args.rounds + 1):
                    result = await submit_load(
                        served.base_url,
                        keys,
                        args.submissions,
                        target=f"http://example.com/bench/{round_no}/",
                    )
                    by_id, total = await _committed(db, result)
                    five_xx = sum(n for s, n in result.statuses.items() if s >= 500)
                    ok = (
                        not result.failures
                        and five_xx == 0
                        and by_id == len(result.accepted)
                        and total - committed_before == len(result.accepted)
                    )
                    committed_before = total
                    failed |= not ok
                    print(
                        f"round {round_no}: {result.summary()}; 202s committed "
                        f"{by_id}/{len(result.accepted)}, jobs in DB {total}: "
                        f"{'OK' if ok else 'FAILED'}"
                    )
                    if result.failures:
                        print("  first failures:", result.failures[:3])
                    report.append(
                        {
                            "round": round_no,
                            "submissions": result.requests,
                            "clients": args.clients,
                            "wall_s": round(result.wall_s, 3),
                            "statuses": dict(result.statuses),
                            "failures": len(result.failures),
                            "p50_ms": round(result.percentile_ms(0.5), 1),
                            "p99_ms": round(result.percentile_ms(0.99), 1),
                            "max_ms": round(result.percentile_ms(1.0), 1),
                            "committed_by_id": by_id,
                            "ok": ok,
                        }
                    )
                code = await served.terminate()
                if code != 0:
                    print(f"trawler serve exited with {code}:\n{served.output()}")
                    failed = True
    finally:
        await db.dispose()
        await pg.admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}, python {platform.python_version()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--submissions", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="default: what the tests use")
    parser.add_argument("--json", default=None, help="write the raw results here")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
