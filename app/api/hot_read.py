"""GET /api/v1/jobs/{id} answered before FastAPI's routing and dependency injection.

Clients poll this route: it is the API's hottest read (bench/api.py). Its route handler
already skips the session and the model, but on one core most of a request's CPU went to
the framework around it (routing, five dependency calls, four middleware layers). This
ASGI middleware answers the common case itself, with the same functions the route uses:

- `GET` of exactly `/api/v1/jobs/<canonical uuid>` with `Authorization: Bearer <key>`,
- the key is in the verified-key cache and not due for re-verification,
- the job exists in the key's tenant.

Anything else (no or unknown key, a key due for re-verification, another tenant's or a
missing job, another method or form of the id) goes on to the app, which answers exactly
as before (401, 404, 405, 422 ...). A database error is answered by the app's own
renderer (503 + Retry-After when the database is out of reach). The route stays in the
app (and in /openapi.json) with the same response; metrics count the fast answers under
its template.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import watch_revocations
from app.api.errors import DATABASE_ERRORS, database_problem
from app.api.routes.common import API_PREFIX
from app.services import apikeys, jobs

_JOB_PATH = re.compile(
    re.escape(API_PREFIX) + r"/jobs/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)
_ROUTE_PATH = API_PREFIX + "/jobs/{job_id}"
_JSON = b"application/json"


@dataclass(frozen=True)
class _Route:
    path: str


_ROUTE = _Route(_ROUTE_PATH)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    return None


class HotReadMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        match = _JOB_PATH.fullmatch(scope["path"])
        key = _bearer(scope) if match else None
        if match is None or key is None:
            await self.app(scope, receive, send)
            return
        principal, due = apikeys.cached_principal(key)
        if principal is None or due:
            await self.app(scope, receive, send)  # verified (or refreshed) by the app
            return
        fastapi_app = scope["app"]
        watch_revocations(fastapi_app)
        try:
            body = await jobs.get_job_json(
                fastapi_app.state.db, principal.tenant, uuid.UUID(match.group(1))
            )
        except DATABASE_ERRORS as error:
            await database_problem("GET", scope["path"], error)(scope, receive, send)
            return
        if body is None:
            await self.app(scope, receive, send)  # the app's 404
            return
        scope["route"] = _ROUTE  # what metrics read: the route template
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(body)).encode("ascii")),
                    (b"content-type", _JSON),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
