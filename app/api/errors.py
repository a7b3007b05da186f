"""The one problem+json renderer, and the FastAPI handlers that answer with it.

The domain errors themselves live in app.errors (no web framework there, so the worker can
raise them without loading FastAPI); they are re-exported here for existing callers."""

from __future__ import annotations

import logging
import re
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.database.connection import UNAVAILABLE_ERRORS, is_unavailable
from app.errors import (
    UNSTORABLE_TEXT,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    TrawlerError,
    Unauthorized,
    Unprocessable,
    is_unstorable_text,
    unavailable_detail,
)

__all__ = [
    "PROBLEM_JSON",
    "UNSTORABLE_TEXT",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "ServiceUnavailable",
    "TooManyRequests",
    "TrawlerError",
    "Unauthorized",
    "Unprocessable",
    "allowed_methods",
    "domain_problem",
    "install_error_handlers",
    "is_unstorable_text",
    "problem",
    "unavailable_detail",
]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    if instance:
        body["instance"] = instance
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


# kept under their old names for callers of this module
_UNAVAILABLE = UNAVAILABLE_ERRORS
_is_unavailable = is_unavailable


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _path_methods(app: FastAPI) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """Each documented path as a pattern, with its methods (built once per app)."""
    table: list[tuple[re.Pattern[str], frozenset[str]]] | None = getattr(
        app.state, "allow_table", None
    )
    if table is None:
        table = []
        for path, item in app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\{[^}/]+\\}", "[^/]+", re.escape(path))
            methods = frozenset(m.upper() for m in item if m in _HTTP_METHODS)
            table.append((re.compile(pattern), methods))
        app.state.allow_table = table
    return table


def allowed_methods(request: Request) -> str | None:
    """Allow for a 405: the methods of every documented operation on the path. Starlette
    names only those of the first route that matched it (GET /jobs/{id} and DELETE
    /jobs/{id} are two routes). None when no documented path matches (the caller keeps
    Starlette's)."""
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for pattern, path_methods in _path_methods(request.app):
        if pattern.fullmatch(path):
            methods |= path_methods
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods)) or None


def domain_problem(path: str, error: TrawlerError) -> JSONResponse:
    """A domain error (404, 409, 422, 429 ...) as problem+json."""
    return problem(
        error.status,
        error.title,
        error.detail,
        instance=path,
        headers=error.headers,
        extra=error.extra,
    )


# what the app answers for a database error (its handler for these classes); asyncpg's
# own errors come from statements sent straight to the driver (ConnectionManager.driver)
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    *_UNAVAILABLE,
    sa_exc.DBAPIError,
    asyncpg.PostgresError,
)


def database_problem(method: str, path: str, error: Exception) -> JSONResponse:
    """A database error as problem+json: 503 + Retry-After when the database is out of
    reach, 422 for text PostgreSQL cannot store, else 500 (logged)."""
    if is_unstorable_text(error):
        return problem(422, "Unprocessable Content", UNSTORABLE_TEXT, instance=path)
    if not _is_unavailable(error):
        logger.exception("unhandled database error on %s", path, exc_info=error)
        return problem(500, "Internal Server Error", "internal error", instance=path)
    detail, retry_after = unavailable_detail(error)
    logger.warning("%s %s: %s (%s)", method, path, detail, error)
    return problem(
        503,
        "Service Unavailable",
        detail,
        instance=path,
        headers={"Retry-After": str(retry_after)},
    )


def install_error_handlers(app: FastAPI) -> None:
    """The problem+json renderers, and their documentation in /openapi.json."""
    from app.api.openapi import install_openapi  # it imports this module

    install_openapi(app)

    @app.exception_handler(TrawlerError)
    async def _domain(request: Request, error: TrawlerError) -> JSONResponse:
        return domain_problem(request.url.path, error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": list(e.get("loc", ())),
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in error.errors()
        ]
        summary = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in errors[:5]
        )
        return problem(
            422,
            "Unprocessable Content",
            summary or "invalid request",
            instance=request.url.path,
            extra={"errors": errors},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        titles = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        headers = dict(error.headers or {})
        allowed = allowed_methods(request) if error.status_code == 405 else None
        if allowed is not None:
            headers["Allow"] = allowed
        return problem(
            error.status_code,
            titles.get(error.status_code, "Error"),
            str(error.detail),
            instance=request.url.path,
            headers=headers,
        )

    async def _database(request: Request, error: Exception) -> JSONResponse:
        return database_problem(request.method, request.url.path, error)

    for cls in DATABASE_ERRORS:
        app.add_exception_handler(cls, _database)
