"""The dashboard's submit form for scrape and crawl jobs.

The form becomes the same request body as POST /api/v1/scrape or /crawl, validated by
the same schemas and submitted by the same service call under the same tenant limits;
what the schemas or the service refuse is shown next to the input it is about.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import DbDep, SettingsDep
from app.api.errors import Conflict, TooManyRequests, Unprocessable
from app.api.resources import get_guard
from app.api.routes.common import check_idempotency_key
from app.services import admin, jobs
from app.ui import cookies
from app.ui.auth import CsrfUserDep, UIUserDep, read_form
from app.ui.forms import JobForm
from app.ui.render import UI_PREFIX, UIRoute, page, see_other

router = APIRouter(prefix="/jobs", route_class=UIRoute)

ENGINES: Final = (("css", "CSS"), ("xpath", "XPath"), ("builtin", "Built-in"))
TAKES: Final = (("text", "Text"), ("html", "HTML"), ("attr", "Attribute"))
LABELS: Final[dict[str, str]] = {
    "urls": "URLs",
    "max_depth": "Maximum depth",
    "max_pages": "Maximum pages",
    "per_host_concurrency": "Fetches at once per host",
    "delay_ms": "Delay between fetches",
    "include": "Only follow URLs matching",
    "exclude": "Never follow URLs matching",
    "priority": "Priority",
    "max_attempts": "Attempts per page",
    "timeout_s": "Timeout per fetch",
}


def _label(name: str) -> str:
    if name.startswith("f-"):
        _, row, part = name.split("-", 2)
        return f"Field {int(row) + 1} {part if part != 'attr' else 'attribute'}"
    return LABELS.get(name, name)


def _form_page(request: Request, form: JobForm, *, status_code: int = 200) -> Response:
    context: dict[str, Any] = {
        "form": form,
        "engines": ENGINES,
        "takes": TAKES,
        "labels": {name: _label(name) for name in form.errors if name},
        "error_count": sum(len(messages) for messages in form.errors.values()),
        # a new key per rendering: a double-click submits one job, a corrected form a new one
        "idempotency_key": str(uuid.uuid4()),
    }
    return page(request, "new_job.html", context, status_code=status_code)


@router.get("/new")
async def new_job(
    request: Request,
    _user: UIUserDep,
    kind: Annotated[Literal["crawl", "scrape"], Query()] = "crawl",
) -> Response:
    return _form_page(request, JobForm.blank(kind))


@router.post("/new")
async def submit_job(
    request: Request, user: CsrfUserDep, db: DbDep, settings: SettingsDep
) -> Response:
    data = await read_form(request)
    form = JobForm.parse(data)
    body = form.to_request()
    if body is None:
        form.pad_rows()
        return _form_page(request, form, status_code=422)
    raw_key = data.get("idempotency_key")
    key = check_idempotency_key(raw_key if isinstance(raw_key, str) and raw_key else None)
    tenant = user.principal.tenant
    try:
        # the tenant's limits (429); the submission is one statement that commits itself
        async with (
            db.session() as session,
            admin.admitted(session, settings, tenant, autocommit=True),
        ):
            job, _created = await jobs.submit_job(
                session,
                tenant,
                body,
                guard=get_guard(request.app),
                idempotency_key=key,
                default_host_limit=settings.per_host_concurrency,
                default_retain_days=settings.default_retain_days,
            )
    except Unprocessable as error:  # a URL the SSRF guard refuses, a webhook URL
        form.add_error("urls", error.detail)
        form.pad_rows()
        return _form_page(request, form, status_code=422)
    except (TooManyRequests, Conflict) as error:
        form.add_error("", error.detail)
        form.pad_rows()
        response = _form_page(request, form, status_code=error.status)
        response.headers.update(error.headers)
        return response
    response = see_other(f"{UI_PREFIX}/jobs/{job.id}")
    cookies.set_flash(request, response, "submitted")
    return response
