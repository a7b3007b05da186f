"""The submission statement alone, with and without its NOTIFY: what the wake-up costs.

    python bench/submit_statement.py [--connections 20] [--duration 8] [--rounds 3]

On a database of its own (``trawler_bench_submit_<pid>`` on --database-url, default
postgresql://postgres@127.0.0.1:5432/postgres; dropped afterwards), --connections asyncpg
connections each run app.services.jobs.submit_job back to back (one new one-URL scrape job
per call, the API's path: one autocommitting statement on the driver connection), for
--duration seconds per variant, the variants alternating over --rounds rounds:

- ``notify``: the statement sends NOTIFY trawler_tasks itself (submit_job(notify=True), what
  the CLI, schedules and the dashboard do);
- ``no notify``: it does not (notify=False: the API's submissions, which wake the executors
  after the commit through app.services.wakeups.TaskWaker, one NOTIFY for many).

Prints commits/s, the CPU of all `postgres` processes per commit, and the latency of a
call (p50/p99). A transaction that has sent a NOTIFY takes a database-wide lock when it
commits and keeps it until its commit record is flushed, so concurrent notifying commits
queue behind each other's WAL flushes.
"""

# ruff: noqa: E402  (the import path is fixed before the imports)
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
ROOT = _HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import os
import statistics
import time

import asyncpg

from app.api.schemas import ScrapeCreate
from app.config import Settings
from app.database.connection import ConnectionManager
from app.database.migrations import upgrade_to_head
from app.services import jobs
from bench.api import postgres_cpu_seconds

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


async def measure(url: str, notify: bool, connections: int, seconds: float) -> dict[str, float]:
    settings = Settings(database_url=url, pool_size=connections, max_overflow=0)
    db = ConnectionManager(settings, application_name="trawler-bench-submit")
    latencies: list[float] = []
    counter = 0
    stop = time.monotonic() + 1.0  # first a one-second warm-up of the pool's connections

    async def loop() -> None:
        nonlocal counter
        while time.monotonic() < stop:
            counter += 1
            request = ScrapeCreate.model_validate({"urls": [f"http://example.com/s/{counter}"]})
            started = time.perf_counter()
            async with db.driver() as conn:
                await jobs.submit_job(conn, "bench", request, notify=notify)
            latencies.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(loop() for _ in range(connections)))
        stop = time.monotonic() + seconds
        latencies.clear()
        cpu0, t0 = postgres_cpu_seconds(), time.monotonic()
        await asyncio.gather(*(loop() for _ in range(connections)))
        wall, cpu = time.monotonic() - t0, postgres_cpu_seconds() - cpu0
    finally:
        await db.dispose()
    latencies.sort()
    n = len(latencies)
    return {
        "tps": n / wall,
        "db_us": cpu / n * 1e6,
        "p50": latencies[n // 2] * 1000,
        "p99": latencies[min(n - 1, int(n * 0.99))] * 1000,
    }


async def run(args: argparse.Namespace) -> None:
    name = f"trawler_bench_submit_{os.getpid()}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = "postgresql+asyncpg://" + args.database_url.split("://", 1)[1].rsplit("/", 1)[0]
    url += f"/{name}"
    try:
        db = ConnectionManager(Settings(database_url=url))
        try:
            await upgrade_to_head(db.engine)
        finally:
            await db.dispose()
        results: dict[str, list[dict[str, float]]] = {"notify": [], "no notify": []}
        order = ["notify", "no notify"]
        await measure(url, True, args.connections, 2.0)  # warm-up
        for rnd in range(1, args.rounds + 1):
            for variant in order if rnd % 2 else list(reversed(order)):
                r = await measure(url, variant == "notify", args.connections, args.duration)
                results[variant].append(r)
                print(
                    f"round {rnd} {variant:>9}: {r['tps']:6.0f} commits/s  PostgreSQL "
                    f"{r['db_us']:4.0f} us/commit  p50 {r['p50']:5.1f} ms  p99 {r['p99']:5.1f} ms",
                    flush=True,
                )
        print()
        print("| variant | commits/s (per round) | PostgreSQL CPU us/commit | p50 ms | p99 ms |")
        print("| --- | --- | ---: | ---: | ---: |")
        for variant, rs in results.items():
            rounds = " / ".join(f"{r['tps']:,.0f}" for r in rs)
            print(
                f"| {variant} | {statistics.mean(r['tps'] for r in rs):,.0f} ({rounds}) | "
                f"{statistics.mean(r['db_us'] for r in rs):,.0f} | "
                f"{statistics.mean(r['p50'] for r in rs):.1f} | "
                f"{max(r['p99'] for r in rs):.1f} |"
            )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=DEFAULT_ADMIN_URL, help="server to create a DB on")
    p.add_argument("--connections", type=int, default=20, help="the API's pool: 10 + 10")
    p.add_argument("--duration", type=float, default=8.0, help="s per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
