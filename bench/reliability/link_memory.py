"""Worker memory and time for one link-dense page (reliability scenario 6, the worst case).

    python bench/reliability/link_memory.py                 # 2.6 MB / 100k links, 10 MiB
    python bench/reliability/link_memory.py --sizes 1000000 5000000

For each size, a fresh `trawler worker` process crawls one page that is nothing but distinct
short links (`/dense/<bytes>` of tests/support/hostile.py; the default max_body_bytes of
10 MiB admits ~590,000 of them) with max_depth 1 and max_pages 50, and the page of 100,000
ordinary anchors that the test suite uses. Reported: the worker's idle RSS, its peak (VmHWM)
and the time until the job is done. Its own database on the PostgreSQL the tests use,
dropped at the end. Results are recorded in docs/RELIABILITY.md.
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
import time  # noqa: E402
import uuid  # noqa: E402

import httpx  # noqa: E402

from app.config import Settings  # noqa: E402
from app.database.connection import ConnectionManager  # noqa: E402
from app.database.migrations import upgrade_to_head  # noqa: E402
from app.main import create_app  # noqa: E402
from app.services import apikeys  # noqa: E402
from tests import pg  # noqa: E402
from tests.support.hostile import LINKS, HostileSite, dense_links_page  # noqa: E402
from tests.support.jobs import wait_terminal  # noqa: E402
from tests.support.workers import worker_id, worker_process  # noqa: E402


async def measure(url: str, db: ConnectionManager, api: httpx.AsyncClient, target: str) -> str:
    async with worker_process(url, TRAWLER_LOG_LEVEL="ERROR") as worker:
        await worker_id(db, worker.pid)
        idle, _ = worker.rss_kib()
        started = time.monotonic()
        response = await api.post(
            "/api/v1/crawl",
            json={
                "seeds": [target],
                "follow": {"max_depth": 1, "max_pages": 50},
                "politeness": {"respect_robots": False},
                "options": {"timeout_s": 60},
            },
        )
        assert response.status_code == 202, response.text
        row = await wait_terminal(db, uuid.UUID(response.json()["id"]), timeout=300)
        took = time.monotonic() - started
        _, peak = worker.rss_kib()
    return (
        f"{row['status']} in {took:.1f}s; worker RSS idle {idle / 1024:.0f} MiB, peak "
        f"{peak / 1024:.0f} MiB (+{(peak - idle) / 1024:.0f} MiB)"
    )


async def run(args: argparse.Namespace) -> None:
    server = args.database_url or pg.server_url()
    name = pg.unique_name("trawler_bench_links")
    await pg.admin_execute(server, f'CREATE DATABASE "{name}"')
    url = pg.with_database(server, name)
    settings = Settings(database_url=url, allow_private_networks=True)
    db = ConnectionManager(settings, application_name="trawler-bench")
    try:
        await upgrade_to_head(db.engine)
        async with db.session() as session:
            _, key = await apikeys.create_key(session, "bench")
        application = create_app(settings, migrate=False)
        async with (
            application.router.lifespan_context(application),
            HostileSite(bomb_size=1024 * 1024).serve() as site,
        ):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(
                transport=transport,
                base_url="http://trawler.test",
                headers={"Authorization": f"Bearer {key}"},
            ) as api:
                page = site.url("/links")
                print(f"{LINKS:,} anchors (2.6 MB): {await measure(url, db, api, page)}")
                for size in args.sizes:
                    links = dense_links_page(size).count(b"<a ")
                    target = site.url(f"/dense/{size}")
                    result = await measure(url, db, api, target)
                    print(f"{size / 1024 / 1024:.1f} MiB, {links:,} links: {result}")
    finally:
        await db.dispose()
        await pg.admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10 * 1024 * 1024 - 1024])
    parser.add_argument("--database-url", default=None, help="default: what the tests use")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
