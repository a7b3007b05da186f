"""Who is signed in to the dashboard, and which form posts to accept.

The session cookie holds the API key (see app.ui.cookies). Every request verifies it
through the API's own key check (app.api.deps.get_principal: the same cache, the same
lookup, the same revocation notifications), so a revoked key stops opening the dashboard
as soon as it stops opening the API.

CSRF: besides SameSite=Strict cookies, every POST carries a token tied to the session: an
HMAC of the session's random nonce keyed with the API key, which no other site can compute
or read. Posts whose Origin (or Sec-Fetch-Site) says they came from another site are
refused as well. The sign-in form, which has no session yet, carries a random token that
must match a cookie set with the form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Annotated, Final
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials
from starlette.datastructures import FormData

from app.api.deps import get_principal
from app.api.errors import Forbidden, Unauthorized
from app.services.apikeys import Principal
from app.ui import cookies
from app.ui.cookies import SessionCookie
from app.ui.render import LoginRequired, UIUser

__all__ = [
    "AdminCsrfDep",
    "AdminUserDep",
    "CsrfUserDep",
    "UIUser",
    "UIUserDep",
    "check_origin",
    "csrf_token_for",
    "principal_for_key",
    "read_form",
]

_CSRF_CONTEXT: Final = b"trawler-ui-csrf:"
MAX_FORM_FIELDS: Final = 600
MAX_FIELD_BYTES: Final = 2 * 1024 * 1024


def csrf_token_for(session: SessionCookie) -> str:
    mac = hmac.new(
        session.key.encode("utf-8"), _CSRF_CONTEXT + session.nonce.encode("ascii"), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def tokens_match(sent: object, expected: str) -> bool:
    if not isinstance(sent, str) or not sent:
        return False
    return hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8"))


async def principal_for_key(request: Request, key: str) -> Principal | None:
    """The key's principal through the API's verification, or None for a bad key."""
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=key)
    try:
        return await get_principal(request, credentials)
    except Unauthorized:
        return None


async def get_ui_user(request: Request) -> UIUser:
    session = cookies.read_session(request)
    if session is None:
        raise LoginRequired()
    principal = await principal_for_key(request, session.key)
    if principal is None:
        raise LoginRequired("the key was revoked or is no longer valid")
    user = UIUser(principal=principal, csrf_token=csrf_token_for(session))
    request.state.ui_user = user  # error pages show the navigation of a signed-in user
    return user


UIUserDep = Annotated[UIUser, Depends(get_ui_user)]


async def get_ui_admin(user: UIUserDep) -> UIUser:
    if not user.principal.is_admin:
        raise Forbidden(
            "The operations view needs an admin API key. Sign out and sign in with an "
            "admin key (trawler apikey create --name NAME --admin) to see it."
        )
    return user


AdminUserDep = Annotated[UIUser, Depends(get_ui_admin)]


def check_origin(request: Request) -> None:
    """Refuse a POST that the browser says another site made."""
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "").lower()
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            raise Forbidden("A form on another site tried to post here; refused.")
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise Forbidden("A form on another site tried to post here; refused.")


async def read_form(request: Request) -> FormData:
    return await request.form(
        max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
    )


async def get_csrf_user(request: Request, user: UIUserDep) -> UIUser:
    """A signed-in user whose POST carries this session's CSRF token."""
    check_origin(request)
    form = await read_form(request)
    sent = form.get("csrf_token") or request.headers.get("X-CSRF-Token")
    if not tokens_match(sent, user.csrf_token):
        raise Forbidden(
            "This form's security token is missing or out of date (was the page opened "
            "before you last signed in?). Reload the page and try again; nothing was changed."
        )
    return user


CsrfUserDep = Annotated[UIUser, Depends(get_csrf_user)]


async def get_csrf_admin(user: CsrfUserDep) -> UIUser:
    return await get_ui_admin(user)


AdminCsrfDep = Annotated[UIUser, Depends(get_csrf_admin)]
