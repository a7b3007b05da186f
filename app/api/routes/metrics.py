"""GET /metrics: Prometheus text format, for an admin key or the metrics token."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.deps import DbDep, MetricsAccessDep, SettingsDep
from app.services import metrics
from app.services.metrics import HttpMetrics, PageStats

router = APIRouter(tags=["metrics"])


def page_stats(request: Request) -> PageStats:
    stats: PageStats | None = getattr(request.app.state, "page_stats", None)
    if stats is None:
        stats = request.app.state.page_stats = PageStats()
    return stats


def http_metrics(request: Request) -> HttpMetrics:
    found: HttpMetrics | None = getattr(request.app.state, "http_metrics", None)
    if found is None:  # an app built without the middleware: no HTTP figures
        found = HttpMetrics()
    return found


@router.get(
    "/metrics",
    status_code=200,
    response_class=Response,
    responses={200: {"content": {metrics.CONTENT_TYPE: {}}, "description": "exposition"}},
)
async def get_metrics(
    request: Request, db: DbDep, settings: SettingsDep, _access: MetricsAccessDep
) -> Response:
    """Pool, queue, jobs, workers, pages by outcome, fetch and HTTP latency histograms."""
    body = await metrics.render(
        db,
        http_metrics(request),
        page_stats(request),
        stale_s=settings.worker_stale_seconds,
        timeout_s=settings.admin_query_timeout,
    )
    return Response(body, media_type=metrics.CONTENT_TYPE)
