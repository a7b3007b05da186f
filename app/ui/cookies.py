"""The dashboard's cookies: the session (the API key and a per-session nonce), the
sign-in form's CSRF token, and one-shot flash messages.

Every cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page
makes the browser send it), limited to /ui, and Secure when the request came over HTTPS.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from fastapi import Request, Response

SESSION_COOKIE: Final = "trawler_session"
LOGIN_COOKIE: Final = "trawler_login"
FLASH_COOKIE: Final = "trawler_flash"
COOKIE_PATH: Final = "/ui"
SESSION_MAX_AGE_S: Final = 8 * 3600  # a working day; then sign in again
LOGIN_MAX_AGE_S: Final = 3600
FLASH_MAX_AGE_S: Final = 60
MAX_KEY_CHARS: Final = 256

# Flash messages are codes, never text taken from a request, so nobody can make the page
# say something else.
FLASH_MESSAGES: Final[dict[str, str]] = {
    "signed-in": "Signed in.",
    "submitted": "Job submitted.",
    "cancelled": "Job cancelled.",
    "retried": "Failed pages queued again.",
    "resumed": "Job resumed.",
    "deleted": "Job deleted.",
    "paused": "Claiming paused: workers finish what they hold and take nothing new.",
    "resumed-queue": "Claiming resumed.",
}


@dataclass(frozen=True, slots=True)
class SessionCookie:
    nonce: str
    key: str


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def read_session(request: Request) -> SessionCookie | None:
    """The session cookie's parts, or None when absent or malformed."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw or len(raw) > MAX_KEY_CHARS + 64:
        return None
    nonce, sep, key = raw.partition(".")
    if not sep or not nonce or not key or len(key) > MAX_KEY_CHARS:
        return None
    return SessionCookie(nonce=nonce, key=key)


def set_session(request: Request, response: Response, key: str) -> SessionCookie:
    """A new session for `key`; a new nonce each time, so each sign-in gets a new CSRF
    token."""
    session = SessionCookie(nonce=new_token(), key=key)
    response.set_cookie(
        SESSION_COOKIE,
        f"{session.nonce}.{session.key}",
        max_age=SESSION_MAX_AGE_S,
        path=COOKIE_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return session


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")


def login_token(request: Request) -> str | None:
    return request.cookies.get(LOGIN_COOKIE) or None


def set_login_token(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=LOGIN_MAX_AGE_S,
        path=COOKIE_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def clear_login_token(response: Response) -> None:
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")


def set_flash(request: Request, response: Response, code: str) -> None:
    assert code in FLASH_MESSAGES, code
    response.set_cookie(
        FLASH_COOKIE,
        code,
        max_age=FLASH_MAX_AGE_S,
        path=COOKIE_PATH,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )


def read_flash(request: Request) -> str | None:
    """The pending flash message (unknown codes are ignored)."""
    code = request.cookies.get(FLASH_COOKIE)
    return FLASH_MESSAGES.get(code) if code else None


def clear_flash(response: Response) -> None:
    response.delete_cookie(FLASH_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
