"""The operations view (admin keys only): queue, pause/resume, this process's pool,
workers and their heartbeats, and a chart of pages stored per minute over the last hour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from fastapi import APIRouter, Request, Response

from app.api.deps import DbDep, SettingsDep
from app.config import Settings
from app.database.connection import ConnectionManager
from app.services import admin
from app.services.admin import Actor
from app.ui import cookies
from app.ui.auth import AdminCsrfDep, AdminUserDep, UIUser
from app.ui.render import UI_PREFIX, UIRoute, nice_ceiling, page, see_other
from app.ui.throughput import Throughput, pages_per_minute

router = APIRouter(prefix="/ops", route_class=UIRoute)

WORKERS_SHOWN: Final = 100

# chart geometry, in SVG user units (the SVG scales to the card's width)
WIDTH: Final = 720
HEIGHT: Final = 200
LEFT: Final = 44
RIGHT: Final = 8
TOP: Final = 10
BOTTOM: Final = 24
BAR_GAP: Final = 2.0


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    ok_y: float
    ok_h: float
    failed_y: float
    failed_h: float
    label: str


@dataclass(frozen=True, slots=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True, slots=True)
class XLabel:
    x: float
    text: str
    anchor: str


@dataclass(frozen=True, slots=True)
class Chart:
    """A stacked bar per minute (stored OK, failed), laid out for the template."""

    width: int
    height: int
    left: int
    right: int
    base: float
    bar_width: float
    bars: list[Bar]
    ticks: list[Tick]
    x_labels: list[XLabel]
    throughput: Throughput

    @property
    def minutes(self) -> list[Any]:
        return list(self.throughput.minutes)

    @property
    def total(self) -> int:
        return self.throughput.total

    @property
    def peak(self) -> Any:
        return self.throughput.peak


def build_chart(throughput: Throughput) -> Chart:
    minutes = throughput.minutes
    top_value = nice_ceiling(max((m.total for m in minutes), default=0))
    plot_h = HEIGHT - TOP - BOTTOM
    base = float(HEIGHT - BOTTOM)
    slot = (WIDTH - LEFT - RIGHT) / max(len(minutes), 1)
    bar_w = round(max(slot - BAR_GAP, 1.0), 2)

    def height(value: int) -> float:
        return round(plot_h * value / top_value, 2)

    bars = []
    for i, m in enumerate(minutes):
        x = round(LEFT + i * slot + BAR_GAP / 2, 2)
        ok_h, failed_h = height(m.ok), height(m.failed)
        label = f"{m.start:%H:%M} UTC: {m.ok:,} stored OK, {m.failed:,} failed"
        bars.append(
            Bar(
                x=x,
                ok_y=round(base - ok_h, 2),
                ok_h=ok_h,
                failed_y=round(base - ok_h - failed_h, 2),
                failed_h=failed_h,
                label=label,
            )
        )
    ticks = [
        Tick(y=round(base - plot_h * f, 2), label=f"{round(top_value * f):,}")
        for f in (0.0, 0.5, 1.0)
    ]
    x_labels = []
    if minutes:
        count = len(minutes)
        for i, anchor in ((0, "start"), (count // 2, "middle"), (count - 1, "end")):
            x = LEFT + (i + 0.5) * slot
            if anchor == "start":
                x = LEFT
            elif anchor == "end":
                x = WIDTH - RIGHT
            x_labels.append(XLabel(x=round(x, 2), text=f"{minutes[i].start:%H:%M}", anchor=anchor))
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        left=LEFT,
        right=RIGHT,
        base=base,
        bar_width=bar_w,
        bars=bars,
        ticks=ticks,
        x_labels=x_labels,
        throughput=throughput,
    )


async def _ops_context(db: ConnectionManager, settings: Settings) -> dict[str, Any]:
    async with db.session() as session:
        conn = await session.connection()
        # the admin routes' server-side limit: a huge queue cannot pile up slow counts
        await admin.limit_statement_time(conn, settings.admin_query_timeout)
        queue = await admin.queue_figures(conn)
        workers = await admin.list_workers(
            conn,
            stale_s=settings.worker_stale_seconds,
            include_stopped=False,
            limit=WORKERS_SHOWN,
        )
        throughput = await pages_per_minute(conn)
    return {
        "queue": queue,
        "workers": workers,
        "pool": {"application_name": db.application_name, **db.pool_status()},
        "chart": build_chart(throughput),
    }


@router.get("")
async def ops_view(
    request: Request, _admin: AdminUserDep, db: DbDep, settings: SettingsDep
) -> Response:
    return page(request, "ops.html", await _ops_context(db, settings))


@router.get("/panels")
async def ops_panels(
    request: Request, _admin: AdminUserDep, db: DbDep, settings: SettingsDep
) -> Response:
    """The view's panels alone, polled by the page."""
    context = await _ops_context(db, settings)
    return page(request, "_ops_panels.html", context, fragment=True)


async def _set_paused(
    request: Request, db: ConnectionManager, user: UIUser, paused: bool
) -> Response:
    # audited like the admin API's pause/resume (admin_audit row + log line)
    await admin.set_paused(db, Actor.of(user.principal), paused)
    response = see_other(f"{UI_PREFIX}/ops")
    cookies.set_flash(request, response, "paused" if paused else "resumed-queue")
    return response


@router.post("/pause")
async def pause(request: Request, user: AdminCsrfDep, db: DbDep) -> Response:
    return await _set_paused(request, db, user, True)


@router.post("/resume")
async def resume(request: Request, user: AdminCsrfDep, db: DbDep) -> Response:
    return await _set_paused(request, db, user, False)
