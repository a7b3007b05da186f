"""The API's two hottest routes answered before FastAPI's routing and dependency injection.

Clients poll `GET /api/v1/jobs/{id}` and submit with `POST /api/v1/scrape` (or `/crawl`):
they are what bench/api.py measures. Their route handlers do little (one statement on the
driver connection), but on one core most of a request's CPU went to the framework around
them (routing, the dependency calls, four middleware layers, the session). This ASGI
middleware answers the common case itself, with the very functions the routes call:

- a `Authorization: Bearer <key>` whose key is in the verified-key cache and not due for
  re-verification (apikeys.cached_principal);
- `GET` of exactly `/api/v1/jobs/<canonical uuid>` of a job in the key's tenant
  (jobs.get_job_json);
- `POST` of `/api/v1/scrape` or `/api/v1/crawl` with a JSON body (`Content-Type:
  application/json`, a Content-Length up to 1 MiB) that the route's model accepts
  (scraper.submit: the same checks, limits and statement as the route; 202 + Location, or
  200 for a replayed Idempotency-Key).

Anything else (no or unknown key, a key due for re-verification, another tenant's or a
missing job, another method or form of the path, a body the model refuses, a chunked or
larger body) goes on to the app, with the body it already read, and the app answers
exactly as before (401, 404, 405, 422 ...). Errors from the submission itself are
rendered by the app's own renderers: domain errors (409, 422, 429) by domain_problem,
database errors by database_problem (503 + Retry-After when the database is out of reach).
The routes stay in the app (and in /openapi.json) with the same answers; metrics count the
fast answers under their templates.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import orjson
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import watch_revocations
from app.api.errors import DATABASE_ERRORS, database_problem, domain_problem
from app.api.resources import get_guard, get_task_waker
from app.api.routes.common import API_PREFIX
from app.api.routes.scraper import SUBMIT_MODELS, submit, submitted_headers
from app.errors import TrawlerError
from app.services import apikeys, jobs
from app.services.apikeys import Principal

_JOB_PATH = re.compile(
    re.escape(API_PREFIX) + r"/jobs/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
)
_JSON = b"application/json"
# larger submissions (up to 10,000 URLs) go through the app: their cost is the database's
MAX_FAST_BODY = 1024 * 1024


@dataclass(frozen=True)
class _Route:
    path: str


_GET_JOB_ROUTE = _Route(API_PREFIX + "/jobs/{job_id}")
_SUBMIT_ROUTES = {path: _Route(path) for path in SUBMIT_MODELS}


def _header(scope: Scope, wanted: bytes) -> str | None:
    """The first value of a header (as Starlette reads it: latin-1), or None."""
    for name, value in scope["headers"]:
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


def _principal(scope: Scope) -> Principal | None:
    """The principal of a Bearer key the app verified recently (None: let the app)."""
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, key = value.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    principal, due = apikeys.cached_principal(key)
    if principal is not None and due:
        # the entry's last moments: answer from it, re-verify beside it (as get_principal
        # does); handing these requests to the app meant the whole framework for every
        # request until the lookup came back, several percent of them under load
        apikeys.refresh(scope["app"].state.db.session, key)
    return principal


def _small_json_body(scope: Scope) -> bool:
    """A JSON body of announced length up to MAX_FAST_BODY (else the app reads it)."""
    content_type = _header(scope, b"content-type")
    length = _header(scope, b"content-length")
    if content_type is None or length is None or not length.isdigit():
        return False
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" and int(length) <= MAX_FAST_BODY


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app after the body was read here: the body first, then the rest
    (a disconnect) as the server delivers it."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class HotPathMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            if method == "GET":
                match = _JOB_PATH.fullmatch(scope["path"])
                if match is not None:
                    await self._get_job(scope, receive, send, uuid.UUID(match.group(1)))
                    return
            elif method == "POST" and scope["path"] in SUBMIT_MODELS:
                await self._submit(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _get_job(self, scope: Scope, receive: Receive, send: Send, job_id: uuid.UUID) -> None:
        principal = _principal(scope)
        if principal is None:
            await self.app(scope, receive, send)  # verified (or refreshed) by the app
            return
        app = scope["app"]
        watch_revocations(app)
        try:
            body = await jobs.get_job_json(app.state.db, principal.tenant, job_id)
        except DATABASE_ERRORS as error:
            await database_problem("GET", scope["path"], error)(scope, receive, send)
            return
        if body is None:
            await self.app(scope, receive, send)  # the app's 404
            return
        scope["route"] = _GET_JOB_ROUTE  # what metrics read: the route template
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

    async def _submit(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = _principal(scope)
        if principal is None or not _small_json_body(scope):
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        if raw is None:
            return  # the client is gone; nothing was submitted
        receive = _replaying(raw, receive)
        path = scope["path"]
        try:
            # what FastAPI does with a JSON body: parse, then validate the Python value
            request = SUBMIT_MODELS[path].model_validate(orjson.loads(raw))
        except (orjson.JSONDecodeError, ValidationError):
            await self.app(scope, receive, send)  # the app's 422 (or 400), as always
            return
        app = scope["app"]
        watch_revocations(app)
        response: Response
        try:
            job, created = await submit(
                app.state.db,
                app.state.settings,
                get_guard(app),
                get_task_waker(app),
                principal.tenant,
                request,
                _header(scope, b"idempotency-key"),
            )
        except TrawlerError as error:
            response = domain_problem(path, error)
        except DATABASE_ERRORS as error:
            response = database_problem("POST", path, error)
        else:
            response = Response(
                job.model_dump_json(),
                status_code=202 if created else 200,
                headers=submitted_headers(job, created),
                media_type="application/json",
            )
        scope["route"] = _SUBMIT_ROUTES[path]
        await response(scope, receive, send)
