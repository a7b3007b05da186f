"""Rendering the dashboard: the Jinja2 environment, HTML responses with their security
headers, error pages, and UIRoute, which turns errors of UI routes into pages."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.api.errors import TrawlerError, unavailable_detail
from app.api.schemas import JobPublic
from app.database.connection import is_unavailable
from app.services.apikeys import Principal
from app.ui import cookies

logger = logging.getLogger(__name__)

UI_PREFIX = "/ui"
STATIC_PREFIX = f"{UI_PREFIX}/static"

# Only files this app serves: no inline script or style anywhere (htmx is configured not
# to inject its indicator styles), so an injected <script> or style attribute does nothing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    # pages show live data and carry the CSRF token: never from a cache
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------------------
# Template helpers


def static_url(name: str) -> str:
    """A vendored file, versioned so a new release is not served from a stale cache."""
    return f"{STATIC_PREFIX}/{name}?v={__version__}"


def url_with(path: str, **params: Any) -> str:
    """`path?a=1&b=2` with the parameters that are not None or empty."""
    kept = {k: v for k, v in params.items() if v not in (None, "", False)}
    return f"{path}?{urlencode(kept, doseq=True)}" if kept else path


def format_dt(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_dt(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def format_age(seconds: float | None) -> str:
    """1.2 s, 42 s, 3 min 5 s, 2 h 10 min."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    total = int(seconds)
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def format_duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "—"
    finish = end or datetime.now(UTC)
    return format_age(max(0.0, (finish - start).total_seconds()))


def format_number(value: float | int | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def short_id(value: object) -> str:
    return str(value)[:8]


def finished_of(job: JobPublic) -> int:
    """A job's tasks that will not run again: succeeded, failed, or not fetched (robots.txt,
    cancelled). The progress bars count these."""
    p = job.progress
    return max(p.total - p.queued - p.running, p.succeeded + p.failed)


def nice_ceiling(value: float) -> int:
    """The axis maximum of a chart: 1, 2 or 5 times a power of ten, at least `value`."""
    if value <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return int(step * magnitude)
    return int(10 * magnitude)


_env = Environment(
    loader=PackageLoader("app.ui", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,
)
_env.globals.update(
    static=static_url,
    url_with=url_with,
    version=__version__,
    prefix=UI_PREFIX,
    finished=finished_of,
)
_env.filters.update(
    dt=format_dt,
    iso=iso_dt,
    age=format_age,
    num=format_number,
    short=short_id,
    duration=format_duration,
)


# --------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True, slots=True)
class UIUser:
    """A signed-in browser: its key's principal and the session's CSRF token."""

    principal: Principal
    csrf_token: str


def _current_user(request: Request) -> UIUser | None:
    user: UIUser | None = getattr(request.state, "ui_user", None)
    return user


def render_html(template: str, context: Mapping[str, Any]) -> str:
    return _env.get_template(template).render(**context)


def page(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    fragment: bool = False,
) -> HTMLResponse:
    """A full page, or a fragment for htmx (`fragment`). The signed-in user (if any) is in
    every template's context; a full page also shows, and clears, a pending flash message."""
    user = _current_user(request)
    flash = None if fragment else cookies.read_flash(request)
    values: dict[str, Any] = {
        "request_path": request.url.path,
        "user": user,
        "csrf_token": user.csrf_token if user else "",
        "flash": flash,
    }
    values.update(context or {})
    response = HTMLResponse(render_html(template, values), status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    if headers:
        response.headers.update(headers)
    if not fragment and cookies.FLASH_COOKIE in request.cookies:
        cookies.clear_flash(response)
    return response


def see_other(url: str) -> RedirectResponse:
    """The answer to a successful POST (post/redirect/get)."""
    response = RedirectResponse(url, status_code=303)
    response.headers["Cache-Control"] = "no-store"
    return response


def error_page(
    request: Request,
    status_code: int,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    return page(
        request,
        "error.html",
        {"status": status_code, "title": title, "detail": detail},
        status_code=status_code,
        headers=headers,
    )


# --------------------------------------------------------------------------------------
# Errors of UI routes become pages


class LoginRequired(Exception):
    """No session, or the session's key is no longer valid: sign in (again)."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "sign in")
        self.reason = reason


def login_redirect(request: Request, reason: str | None = None) -> Response:
    """Pages go to the sign-in page (and come back after it); fragments polled by htmx get
    a 401 whose HX-Redirect sends the whole page there; a progress stream gets a plain 401.
    The session cookie, if any, is cleared: it no longer opens anything."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = url_with(
        f"{UI_PREFIX}/login",
        next=target if request.method == "GET" else None,
        expired="1" if reason else None,
    )
    response: Response
    if request.headers.get("HX-Request"):
        response = Response(status_code=401, headers={"HX-Redirect": login})
    elif "text/event-stream" in request.headers.get("accept", ""):
        response = Response("sign in again", status_code=401, media_type="text/plain")
    else:
        response = see_other(login)
    cookies.clear_session(response)
    return response


_TITLES = {
    400: "Bad request",
    403: "Not allowed",
    404: "Not found",
    409: "Not possible right now",
    422: "Invalid input",
    429: "Slow down",
    503: "Temporarily unavailable",
}


def _validation_page(request: Request, error: RequestValidationError) -> HTMLResponse:
    errors = list(error.errors())
    if any(tuple(e.get("loc", ()))[:1] == ("path",) for e in errors):
        # a malformed id in the address is a page that does not exist
        return error_page(request, 404, "Not found", "There is no such page.")
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in tuple(e.get("loc", ()))[1:]) or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return error_page(request, 422, "Invalid input", "; ".join(parts) or "invalid request")


class UIRoute(APIRoute):
    """Errors of a UI route become HTML pages, not problem+json.

    Handlers run their database work in explicit units of work (`db.session()`), which
    roll back before an error reaches this wrapper; nothing here ever commits.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired as error:
                return login_redirect(request, error.reason)
            except TrawlerError as error:
                title = _TITLES.get(error.status, error.title)
                return error_page(request, error.status, title, error.detail, headers=error.headers)
            except RequestValidationError as error:
                return _validation_page(request, error)
            except StarletteHTTPException as error:  # e.g. an oversized form: 400
                title = _TITLES.get(error.status_code, "Error")
                return error_page(request, error.status_code, title, str(error.detail))
            except Exception as error:
                if is_unavailable(error):
                    detail, retry_after = unavailable_detail(error)
                    logger.warning(
                        "%s %s: %s (%s)", request.method, request.url.path, detail, error
                    )
                    return error_page(
                        request,
                        503,
                        "Temporarily unavailable",
                        f"{detail[0].upper()}{detail[1:]}. This page will work again as soon "
                        "as the database answers; nothing was changed.",
                        headers={"Retry-After": str(retry_after)},
                    )
                logger.exception("UI %s %s failed", request.method, request.url.path)
                return error_page(
                    request,
                    500,
                    "Something went wrong",
                    "An internal error occurred; it has been logged. Try again, or tell the "
                    "operator the time it happened.",
                )

        return handle
