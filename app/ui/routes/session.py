"""Signing in and out of the dashboard."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.ui import cookies
from app.ui.auth import CsrfUserDep, check_origin, principal_for_key, read_form, tokens_match
from app.ui.render import UI_PREFIX, UIRoute, page, see_other

router = APIRouter(route_class=UIRoute)

HOME = f"{UI_PREFIX}/jobs"
# a path of this dashboard, nothing else (no scheme, no host, no "//", no backslash)
_SAFE_NEXT = re.compile(rf"^{UI_PREFIX}(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?(\?[^\s\\#]*)?$")


def safe_next(value: object) -> str:
    """Where to go after signing in: the page asked for, if it is one of ours."""
    if isinstance(value, str) and _SAFE_NEXT.match(value) and "//" not in value:
        return value
    return HOME


def _login_page(
    request: Request,
    *,
    next_url: str,
    error: str | None = None,
    expired: bool = False,
    status_code: int = 200,
) -> Response:
    token = cookies.new_token()
    response = page(
        request,
        "login.html",
        {"login_token": token, "next": next_url, "error": error, "expired": expired},
        status_code=status_code,
    )
    cookies.set_login_token(request, response, token)
    return response


@router.get("/login")
async def login_form(
    request: Request,
    next_: Annotated[str | None, Query(alias="next", max_length=2048)] = None,
    expired: Annotated[str | None, Query(max_length=8)] = None,
) -> Response:
    """The sign-in form; someone already signed in goes straight on."""
    session = cookies.read_session(request)
    if session is not None and await principal_for_key(request, session.key) is not None:
        return see_other(safe_next(next_))
    return _login_page(request, next_url=safe_next(next_), expired=bool(expired))


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the key like the API does; on success the session cookie holds it."""
    check_origin(request)
    form = await read_form(request)
    next_url = safe_next(form.get("next"))
    expected = cookies.login_token(request)
    if expected is None or not tokens_match(form.get("login_token"), expected):
        return _login_page(
            request,
            next_url=next_url,
            error="This sign-in form had expired (or cookies are blocked). Try again.",
            status_code=403,
        )
    raw = form.get("api_key")
    key = raw.strip() if isinstance(raw, str) else ""
    if not key:
        return _login_page(request, next_url=next_url, error="Enter an API key.", status_code=422)
    principal = None
    if len(key) <= cookies.MAX_KEY_CHARS:
        principal = await principal_for_key(request, key)
    if principal is None:
        return _login_page(
            request,
            next_url=next_url,
            error="That API key is not valid, or it was revoked.",
            status_code=401,
        )
    response = see_other(next_url)
    cookies.set_session(request, response, key)
    cookies.clear_login_token(response)
    cookies.set_flash(request, response, "signed-in")
    return response


@router.post("/logout")
async def logout(_user: CsrfUserDep) -> Response:
    response = see_other(f"{UI_PREFIX}/login")
    cookies.clear_session(response)
    return response
