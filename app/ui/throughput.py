"""Pages stored per minute over the last hour, for the operations view's chart.

`pages` has no index on `fetched_at`, but its ids grow with it: a page is inserted (and
stamped `now()`) as its task completes. So the first page of the window is found by a
binary search over the primary key (one statement, ~log2(rows) index probes), and only
the pages from there on are read, by a primary-key range scan. The search starts a few
minutes early and the window is still filtered on `fetched_at`, so pages of concurrent
workers committed slightly out of order are counted too. Cost: proportional to the pages
of the last hour, bounded by the caller's statement timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

WINDOW_MINUTES: Final = 60
SEARCH_SLACK_MINUTES: Final = 5

# (lo, hi): the first id at or after the window's start lies in [lo, hi]; hi = max + 1
# means "none". Each step probes the first existing id at or after the midpoint.
_THROUGHPUT_SQL = text(
    """
WITH RECURSIVE
window_start AS (
    SELECT date_trunc('minute', now()) - make_interval(mins => :minutes - 1) AS since
),
search(lo, hi) AS (
    SELECT (SELECT min(id) FROM pages), (SELECT max(id) FROM pages) + 1
  UNION ALL
    SELECT CASE WHEN probe.fetched_at >= w.since - make_interval(mins => :slack)
                THEN s.lo ELSE probe.id + 1 END,
           CASE WHEN probe.fetched_at >= w.since - make_interval(mins => :slack)
                THEN (s.lo + s.hi) / 2 ELSE s.hi END
    FROM search s
    CROSS JOIN window_start w
    CROSS JOIN LATERAL (
        SELECT id, fetched_at FROM pages WHERE id >= (s.lo + s.hi) / 2 ORDER BY id LIMIT 1
    ) probe
    WHERE s.lo < s.hi
),
first_id AS (
    SELECT lo FROM search WHERE lo >= hi
)
SELECT date_trunc('minute', p.fetched_at) AS minute,
       count(*) FILTER (WHERE p.ok) AS ok,
       count(*) FILTER (WHERE NOT p.ok) AS failed
FROM pages p
WHERE p.id >= (SELECT lo FROM first_id)
  AND p.fetched_at >= (SELECT since FROM window_start)
GROUP BY 1
"""
)
_NOW_SQL = text("SELECT date_trunc('minute', now()) AS minute")


@dataclass(frozen=True, slots=True)
class Minute:
    start: datetime
    ok: int
    failed: int

    @property
    def total(self) -> int:
        return self.ok + self.failed


@dataclass(frozen=True, slots=True)
class Throughput:
    minutes: list[Minute]  # oldest first, the current (partial) minute last

    @property
    def total(self) -> int:
        return sum(m.total for m in self.minutes)

    @property
    def peak(self) -> Minute | None:
        best = max(self.minutes, key=lambda m: m.total, default=None)
        return best if best is not None and best.total else None


async def pages_per_minute(conn: AsyncConnection, minutes: int = WINDOW_MINUTES) -> Throughput:
    """One bucket per minute, the empty ones included, all tenants together."""
    now_minute: datetime = (await conn.execute(_NOW_SQL)).scalar_one()
    rows = (
        await conn.execute(_THROUGHPUT_SQL, {"minutes": minutes, "slack": SEARCH_SLACK_MINUTES})
    ).mappings()
    counts = {row["minute"]: (int(row["ok"]), int(row["failed"])) for row in rows}
    buckets = []
    for back in range(minutes - 1, -1, -1):
        start = now_minute - timedelta(minutes=back)
        ok, failed = counts.get(start, (0, 0))
        buckets.append(Minute(start=start, ok=ok, failed=failed))
    return Throughput(minutes=buckets)
