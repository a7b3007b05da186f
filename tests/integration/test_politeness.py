"""Cluster-wide per-host politeness in the claim: concurrency, spacing, Retry-After, fairness.

Each "worker" here is its own connection claiming in its own transaction, as executors in
different processes do; the assertions read what ended up leased in the database.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from sqlalchemy import text

from app.database.connection import ConnectionManager
from app.services import queue
from tests.support.jobs import create_job


async def claim_once(
    db: ConnectionManager, limit: int = 100, cursor: str = "", hold: float = 0.0
) -> queue.Claim:
    async with db.connect() as conn:
        claim = await queue.claim(conn, uuid.uuid4(), limit, 60.0, cursor=cursor)
        # an executor does more in the claim's transaction (marks jobs running): keep it
        # open a while so that concurrent claims really overlap
        await asyncio.sleep(hold)
        return claim


async def set_host(db: ConnectionManager, host: str, **values: object) -> None:
    sets = ", ".join(f"{k} = :{k}" for k in values)
    async with db.connect() as conn:
        await conn.execute(text(f"UPDATE hosts SET {sets} WHERE host = :h"), {"h": host, **values})


async def leased_by_host(db: ConnectionManager) -> dict[str, int]:
    async with db.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT host, count(*) FROM task_queue WHERE lease_owner IS NOT NULL GROUP BY host"
            )
        )
        return {r[0]: r[1] for r in rows}


async def finish(db: ConnectionManager, claim: queue.Claim) -> None:
    """Complete every task of a claim (each by its own lease owner)."""
    async with db.connect() as conn:
        owners = await conn.execute(
            text("SELECT task_id, lease_owner FROM task_queue WHERE task_id = ANY(:ids)"),
            {"ids": [t.id for t in claim.tasks]},
        )
        for task_id, owner in owners.all():
            job = next(t.job_id for t in claim.tasks if t.id == task_id)
            await queue.complete(conn, owner, [queue.Outcome(task_id, job, "skipped")])


async def test_concurrent_claimers_never_exceed_a_hosts_limit(db: ConnectionManager) -> None:
    await create_job(db, [f"http://busy.example/{n}" for n in range(200)], host_limit=3)

    async def worker() -> int:
        got = 0
        for _ in range(15):
            got += len((await claim_once(db, limit=2, hold=0.01)).tasks)
        return got

    claimed = await asyncio.gather(*(worker() for _ in range(6)))
    # 90 claims raced for the host; only its limit was granted, by the database's count
    assert sum(claimed) == 3
    assert await leased_by_host(db) == {"busy.example": 3}


async def test_room_returns_as_leases_end(db: ConnectionManager) -> None:
    await create_job(db, [f"http://busy.example/{n}" for n in range(10)], host_limit=4)
    first = await claim_once(db)
    assert len(first.tasks) == 4
    assert (await claim_once(db)).tasks == []
    half = queue.Claim(first.tasks[:2], first.cursor, first.hosts)
    await finish(db, half)
    assert len((await claim_once(db)).tasks) == 2
    assert await leased_by_host(db) == {"busy.example": 4}


async def test_fetched_tasks_free_room_for_every_worker(db: ConnectionManager) -> None:
    """Leased tasks whose requests are over (page not stored yet), once their worker names
    them in a claim, no longer count against their host, in any worker's claim."""
    await create_job(db, [f"http://busy.example/{n}" for n in range(10)], host_limit=3)
    me, other = uuid.uuid4(), uuid.uuid4()

    async def claim_as(worker: uuid.UUID, done: list[int]) -> queue.Claim:
        async with db.connect() as conn:
            return await queue.claim(conn, worker, 10, 60.0, done=done)

    first = await claim_as(me, [])
    assert len(first.tasks) == 3
    fetched = [t.id for t in first.tasks[:2]]  # two fetches over, one still running
    assert (await claim_as(other, [])).tasks == []  # not named yet: the host is full
    # naming tasks that are not ours, or not leased, frees nothing
    assert (await claim_as(other, fetched)).tasks == []
    assert (await claim_as(me, [10**12, 10**12 + 1])).tasks == []
    second = await claim_as(me, fetched)
    assert len(second.tasks) == 2
    # 5 leased now, but at most 3 fetching: the 2 fetched tasks and 3 in flight
    assert await leased_by_host(db) == {"busy.example": 5}
    assert (await claim_as(other, [])).tasks == []  # 3 in flight: full for everyone
    await finish(db, queue.Claim(second.tasks, second.cursor, second.hosts))
    third = await claim_as(other, [])  # the marks hold for the other worker too
    assert len(third.tasks) == 2


async def test_a_saturated_host_does_not_stall_other_hosts(db: ConnectionManager) -> None:
    # a big, older job on one host with a tight limit, then a small job on another host
    await create_job(db, [f"http://slow.example/{n}" for n in range(500)], host_limit=2)
    await create_job(db, [f"http://fast.example/{n}" for n in range(5)], host_limit=8)
    claim = await claim_once(db, limit=10)
    hosts = [t.host for t in claim.tasks]
    assert hosts.count("slow.example") == 2
    assert hosts.count("fast.example") == 5
    assert (await claim_once(db, limit=10)).tasks == []


async def test_hosts_take_turns(db: ConnectionManager) -> None:
    for name in ("a", "b", "c"):
        await create_job(db, [f"http://{name}.example/{n}" for n in range(5)], host_limit=8)
    cursor, order = "", []
    for _ in range(4):
        claim = await claim_once(db, limit=1, cursor=cursor)
        order.append(claim.tasks[0].host)
        cursor = claim.cursor
    assert order == ["a.example", "b.example", "c.example", "a.example"]


async def test_a_delay_spaces_grants_across_workers(db: ConnectionManager) -> None:
    await create_job(db, [f"http://polite.example/{n}" for n in range(5)], host_limit=8)
    await set_host(db, "polite.example", delay_ms=400)
    first = await claim_once(db)
    assert [t.delay_ms for t in first.tasks] == [400], "one task at a time, with its delay"
    assert (await claim_once(db)).tasks == [], "nothing while one is leased"
    started = time.monotonic()
    await finish(db, first)
    assert (await claim_once(db)).tasks == [], "nothing before the delay is over"
    while not (second := await claim_once(db)).tasks:
        await asyncio.sleep(0.02)
    assert time.monotonic() - started >= 0.3
    assert len(second.tasks) == 1


async def test_robots_crawl_delay_counts_as_a_delay(db: ConnectionManager) -> None:
    await create_job(db, [f"http://robots.example/{n}" for n in range(3)], host_limit=8)
    await set_host(db, "robots.example", robots_delay_ms=1000)
    assert [t.delay_ms for t in (await claim_once(db)).tasks] == [1000]


async def test_fetch_start_pushes_the_next_grant(db: ConnectionManager) -> None:
    await create_job(db, [f"http://late.example/{n}" for n in range(3)], host_limit=8)
    await set_host(db, "late.example", delay_ms=300)
    first = await claim_once(db)
    await asyncio.sleep(0.35)  # the worker starts the fetch late (its slots were busy)
    async with db.connect() as conn:
        await queue.mark_fetch_started(conn, "late.example", 0.3)
    await finish(db, first)
    assert (await claim_once(db)).tasks == [], "the spacing counts from the real start"


async def test_retry_after_blocks_a_host_for_every_worker(db: ConnectionManager) -> None:
    await create_job(db, [f"http://limited.example/{n}" for n in range(3)], host_limit=8)
    await create_job(db, [f"http://other.example/{n}" for n in range(3)], host_limit=8)
    async with db.connect() as conn:
        await queue.block_host(conn, "limited.example", 30)
    claim = await claim_once(db)
    assert {t.host for t in claim.tasks} == {"other.example"}


async def test_paused_cluster_grants_nothing(db: ConnectionManager) -> None:
    await create_job(db, [f"http://p.example/{n}" for n in range(3)])
    async with db.connect() as conn:
        await conn.execute(text("UPDATE cluster_state SET paused = true"))
    try:
        assert (await claim_once(db)).tasks == []
    finally:
        async with db.connect() as conn:
            await conn.execute(text("UPDATE cluster_state SET paused = false"))
    assert len((await claim_once(db)).tasks) == 3
