"""Prometheus metrics: this process's HTTP latency and pool, cluster figures from the database.

Two kinds of figures, and where each comes from:

* this API process's own: HTTP request latency by route (ObservabilityMiddleware, which
  also gives every request its id) and its connection pool;
* the cluster's, read from PostgreSQL on each scrape because workers are other processes:
  queue depth, jobs by status, workers, and pages fetched by outcome with the fetch latency
  histogram. Every API replica reports the same cluster figures: aggregate them with
  max(), not sum().

Pages are counted incrementally (PageStats): each scrape reads only the pages stored since
the previous one, by primary-key range, so the cost follows the fetch rate, not the size of
the table. The counters start at zero when the process starts watching (the first scrape),
like any Prometheus counter after a restart.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.database.connection import ConnectionManager, DatabaseUnavailable
from app.logging import request_id_var
from app.services.admin import QueuePublic, limit_statement_time, queue_figures

logger = logging.getLogger(__name__)

HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FETCH_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
PAGE_OUTCOMES = ("ok", "http_error", "fetch_error")


# --------------------------------------------------------------------------------------
# Histograms and the HTTP middleware


@dataclass
class Histogram:
    """Cumulative-on-render histogram: counts per bucket (the last one is +Inf), sum, count."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
UNMATCHED_ROUTE = "<unmatched>"


class HttpMetrics:
    """Request latency by (method, route template, status class); bounded label sets."""

    def __init__(self) -> None:
        self.histograms: dict[tuple[str, str, str], Histogram] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method if method in _METHODS else "OTHER", route, f"{status // 100}xx")
        histogram = self.histograms.get(key)
        if histogram is None:
            histogram = self.histograms[key] = Histogram(HTTP_BUCKETS_S)
        histogram.observe(seconds)


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class ObservabilityMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: streams pass through untouched).

    Gives each request an id (a sane client `X-Request-ID` is kept, else a new one), sets
    it in the logging context and echoes it in the response, and records the latency until
    the response starts (for SSE streams: until the stream opened) under the route template.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        header = (b"x-request-id", request_id.encode("ascii"))
        started = time.perf_counter()
        recorded = False

        async def send_with_id(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                self.metrics.observe(
                    scope["method"],
                    _route_of(scope),
                    int(message["status"]),
                    time.perf_counter() - started,
                )
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            if not recorded:  # an unhandled error: the server answers 500 outside us
                self.metrics.observe(
                    scope["method"], _route_of(scope), 500, time.perf_counter() - started
                )


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


# --------------------------------------------------------------------------------------
# Pages fetched, counted incrementally from the database


# Pages stored with ids in (:lo, :hi]: a primary-key range, at most MAX_PAGES_PER_SCRAPE rows
_PAGES_SQL = text(
    "SELECT count(*) FILTER (WHERE ok) AS ok, "
    "count(*) FILTER (WHERE NOT ok AND status_code IS NOT NULL) AS http_error, "
    "count(*) FILTER (WHERE NOT ok AND status_code IS NULL) AS fetch_error, "
    "count(elapsed_ms) AS timed, coalesce(sum(elapsed_ms), 0) AS ms, "
    + ", ".join(
        f"count(*) FILTER (WHERE elapsed_ms <= {bound}) AS le{i}"
        for i, bound in enumerate(FETCH_BUCKETS_MS)
    )
    + " FROM pages WHERE id > :lo AND id <= :hi"
)
_MAX_PAGE_ID_SQL = text("SELECT coalesce(max(id), 0) FROM pages")


class PageStats:
    """Pages fetched by outcome and their fetch latency, since this process started watching.

    A page id is allocated when its row is inserted, and the row commits a moment later, so
    ids up to the highest committed one are not all visible yet. Each scrape therefore
    counts only up to the highest id seen at least SETTLE_S earlier: by then every row with
    a smaller id has committed (or rolled back, leaving a gap). Results lag by SETTLE_S plus
    one scrape interval; a scrape reads at most MAX_PAGES_PER_SCRAPE rows and continues
    where it stopped next time.
    """

    SETTLE_S = 5.0
    MAX_PAGES_PER_SCRAPE = 200_000

    def __init__(self) -> None:
        self.counted_upto: int | None = None
        self.outcomes: dict[str, int] = dict.fromkeys(PAGE_OUTCOMES, 0)
        self.latency = Histogram([b / 1000 for b in FETCH_BUCKETS_MS])
        self._seen: deque[tuple[float, int]] = deque(maxlen=64)  # (monotonic, max id)
        self._lock = asyncio.Lock()

    async def update(self, conn: AsyncConnection) -> None:
        async with self._lock:
            now = time.monotonic()
            max_id = int((await conn.execute(_MAX_PAGE_ID_SQL)).scalar_one())
            if self.counted_upto is None:
                self.counted_upto = max_id  # count from here on
                return
            self._seen.append((now, max_id))
            settled = self.counted_upto
            while self._seen and self._seen[0][0] <= now - self.SETTLE_S:
                settled = max(settled, self._seen.popleft()[1])
            hi = min(settled, self.counted_upto + self.MAX_PAGES_PER_SCRAPE)
            if hi <= self.counted_upto:
                return
            row = (
                (await conn.execute(_PAGES_SQL, {"lo": self.counted_upto, "hi": hi}))
                .mappings()
                .one()
            )
            self._add(row)
            self.counted_upto = hi

    def _add(self, row: Mapping[Any, Any]) -> None:
        for outcome in PAGE_OUTCOMES:
            self.outcomes[outcome] += int(row[outcome])
        cumulative = [int(row[f"le{i}"]) for i in range(len(FETCH_BUCKETS_MS))]
        timed = int(row["timed"])
        previous = 0
        for i, upto in enumerate([*cumulative, timed]):
            self.latency.counts[i] += upto - previous
            previous = upto
        self.latency.total += int(row["ms"]) / 1000
        self.latency.count += timed


# --------------------------------------------------------------------------------------
# Rendering (Prometheus text exposition format 0.0.4)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Exposition:
    """Collects metric families and renders them; each family is declared once."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self._lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histograms(
        self,
        name: str,
        help_text: str,
        series: Iterable[tuple[Mapping[str, str], Histogram]],
    ) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} histogram")
        for labels, histogram in series:
            running = 0
            for bound, count in zip([*histogram.bounds, math.inf], histogram.counts, strict=True):
                running += count
                le = {**labels, "le": _number(bound)}
                self._lines.append(f"{name}_bucket{_labels(le)} {running}")
            self._lines.append(f"{name}_sum{_labels(labels)} {_number(histogram.total)}")
            self._lines.append(f"{name}_count{_labels(labels)} {histogram.count}")

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


def one(value: float) -> list[tuple[Mapping[str, str], float]]:
    return [({}, value)]


# --------------------------------------------------------------------------------------
# One scrape


_WORKERS_SQL = text(
    """
SELECT count(*) FILTER (WHERE heartbeat_at > now() - make_interval(secs => :stale)) AS live,
       count(*) FILTER (WHERE heartbeat_at <= now() - make_interval(secs => :stale)) AS stale,
       count(*) FILTER (WHERE state = 'draining') AS draining
FROM workers WHERE state <> 'stopped'
"""
)


@dataclass
class ClusterFigures:
    queue: QueuePublic
    workers: Mapping[str, int]


async def _cluster(
    conn: AsyncConnection, pages: PageStats, *, stale_s: float, timeout_s: float
) -> ClusterFigures:
    await limit_statement_time(conn, timeout_s)
    figures = await queue_figures(conn)
    workers = (await conn.execute(_WORKERS_SQL, {"stale": stale_s})).mappings().one()
    await pages.update(conn)
    return ClusterFigures(queue=figures, workers=dict(workers))


def _pool(out: Exposition, pool: Mapping[str, Any]) -> None:
    gauges = {
        "size": "connections the pool keeps",
        "checked_out": "connections in use",
        "checked_in": "idle connections in the pool",
        "overflow": "connections open beyond the pool size",
        "max_overflow": "most connections allowed beyond the pool size",
    }
    for key, help_text in gauges.items():
        out.family(f"trawler_db_pool_{key}", "gauge", help_text, one(pool[key]))
    counters = {
        "connects": "connections opened",
        "checkouts": "connections handed out",
        "checkins": "connections given back",
        "invalidations": "connections found dead or discarded",
        "timeouts": "checkouts that gave up after POOL_TIMEOUT",
    }
    for key, help_text in counters.items():
        out.family(f"trawler_db_pool_{key}_total", "counter", help_text, one(pool[key]))
    waits = pool["wait_ms"]
    out.family(
        "trawler_db_pool_wait_seconds",
        "gauge",
        "checkout wait over the last 2048 checkouts",
        [({"stat": stat}, waits[stat] / 1000) for stat in ("p50", "p99", "max")],
    )


def _cluster_families(out: Exposition, cluster: ClusterFigures, pages: PageStats) -> None:
    q = cluster.queue
    out.family(
        "trawler_queue_tasks",
        "gauge",
        "tasks in the queue by status (due and delayed split the queued ones)",
        [({"status": k}, v) for k, v in q.by_status.items()],
    )
    out.family(
        "trawler_queue_tasks_by_priority",
        "gauge",
        "queued and leased tasks by priority",
        [
            ({"priority": str(p.priority), "status": status}, getattr(p, status))
            for p in q.by_priority
            for status in ("queued", "leased")
        ],
    )
    out.family(
        "trawler_queue_oldest_queued_age_seconds",
        "gauge",
        "how long the longest-waiting due task has waited",
        one(q.oldest_queued_age_s or 0.0),
    )
    out.family(
        "trawler_queue_expired_leases",
        "gauge",
        "leased tasks past their lease",
        one(q.expired_leases),
    )
    out.family("trawler_queue_paused", "gauge", "1 while claiming is paused", one(int(q.paused)))
    out.family(
        "trawler_jobs",
        "gauge",
        "jobs by status",
        [({"status": k}, v) for k, v in q.jobs_by_status.items()],
    )
    out.family(
        "trawler_workers",
        "gauge",
        "registered workers not stopped: live (heartbeating) or stale (silent)",
        [
            ({"status": "live"}, cluster.workers["live"]),
            ({"status": "stale"}, cluster.workers["stale"]),
        ],
    )
    out.family(
        "trawler_workers_draining",
        "gauge",
        "workers asked to drain",
        one(cluster.workers["draining"]),
    )
    out.family(
        "trawler_pages_fetched_total",
        "counter",
        "pages stored by outcome (ok, http_error: an error status, fetch_error: no answer)",
        [({"outcome": k}, v) for k, v in pages.outcomes.items()],
    )
    out.histograms(
        "trawler_fetch_duration_seconds",
        "fetch latency of stored pages",
        [({}, pages.latency)],
    )


async def render(
    db: ConnectionManager,
    http: HttpMetrics,
    pages: PageStats,
    *,
    stale_s: float,
    timeout_s: float,
) -> str:
    """The whole exposition. When the database does not answer within `timeout_s`, the
    process's own figures are still served and trawler_cluster_figures_ok is 0."""
    out = Exposition()
    _pool(out, db.pool_status())
    cluster: ClusterFigures | None = None
    try:
        cluster = await db.bounded(
            "metrics",
            lambda conn: _cluster(conn, pages, stale_s=stale_s, timeout_s=timeout_s),
            limit=timeout_s,
        )
    except DatabaseUnavailable as error:
        logger.warning("cluster figures for /metrics unavailable: %s", error)
    out.family(
        "trawler_cluster_figures_ok",
        "gauge",
        "1 when the queue, job, worker and page figures below were read from the database",
        one(int(cluster is not None)),
    )
    if cluster is not None:
        _cluster_families(out, cluster, pages)
    out.histograms(
        "trawler_http_request_duration_seconds",
        "time until the response started, by route template (this process)",
        [
            ({"method": m, "route": r, "status": s}, h)
            for (m, r, s), h in sorted(http.histograms.items())
        ],
    )
    return out.render()
