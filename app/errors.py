"""Domain errors carrying their HTTP status, free of any web framework.

The services (and the worker, which runs them without the API) raise these; the API turns
them into problem+json answers (app.api.errors, which re-exports them). Keep this module
importable without FastAPI or Starlette: `trawler worker` must not load the web stack.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc


class TrawlerError(Exception):
    """Base of every error the API turns into a problem+json answer."""

    status: int = 500
    title: str = "Internal Server Error"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}


class BadRequest(TrawlerError):
    status, title = 400, "Bad Request"


class Unauthorized(TrawlerError):
    status, title = 401, "Unauthorized"

    def __init__(self, detail: str = "a valid API key is required") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(TrawlerError):
    status, title = 403, "Forbidden"


class NotFound(TrawlerError):
    status, title = 404, "Not Found"


class Conflict(TrawlerError):
    status, title = 409, "Conflict"


class Unprocessable(TrawlerError):
    status, title = 422, "Unprocessable Content"


class TooManyRequests(TrawlerError):
    status, title = 429, "Too Many Requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


class ServiceUnavailable(TrawlerError):
    status, title = 503, "Service Unavailable"

    def __init__(self, detail: str, *, retry_after: int = 2) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


# SQLSTATEs of text PostgreSQL cannot take: a NUL character in a text parameter (22021)
# or in JSON (\u0000, 22P05). Only a request carries such text: a 422, never a 500.
_UNSTORABLE_TEXT_SQLSTATES = frozenset({"22021", "22P05"})
UNSTORABLE_TEXT = "text must not contain NUL (U+0000) characters"


def is_unstorable_text(error: BaseException) -> bool:
    """Through SQLAlchemy (the driver's error is `orig`) or straight from asyncpg."""
    source = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    return getattr(source, "sqlstate", None) in _UNSTORABLE_TEXT_SQLSTATES


def unavailable_detail(error: BaseException) -> tuple[str, int]:
    if isinstance(error, sa_exc.TimeoutError):
        return "all database connections are busy; try again shortly", 1
    return "the database is unavailable; try again shortly", 2
