"""Who is signed in to the console, and the guard on every form that changes something.

The session is the API token itself, in an HttpOnly, SameSite=Strict cookie (Secure over
https), looked up exactly as a bearer token is (`api.deps.user_for_token`). Every state-changing
form carries a per-session CSRF token in a hidden field, and a request whose Origin names another
site is refused: SameSite=Strict alone does not cover sibling instances on the same host (the
hub on :8100 and the spoke on :8101 are the same *site*, and cookies ignore ports).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request, Response

from api.deps import app_pool, user_for_token
from federation.errors import Forbidden, Unauthenticated
from federation.users import User

CSRF_FIELD = "csrf"


class NotSignedIn(Unauthenticated):
    """No console session: pages send the browser to the sign-in page."""


class CrossSiteRefused(Forbidden):
    code = "cross_site_refused"
    title = "Form refused: it did not come from this console"


def cookie_name(request: Request) -> str:
    # Cookies are shared by every port of a host: one name per instance address.
    return f"fedagent_console_{request.url.port or request.url.scheme}"


def session_token(request: Request) -> str | None:
    return request.cookies.get(cookie_name(request)) or None


def csrf_token(token: str) -> str:
    """Bound to the session: only someone who holds the cookie's token can compute it."""
    return hashlib.sha256(b"fedagent-console-csrf\0" + token.encode()).hexdigest()[:40]


async def console_user(request: Request) -> User:
    token = session_token(request)
    if token is None:
        raise NotSignedIn("sign in with an API token")
    try:
        return await user_for_token(app_pool(request), token)
    except Unauthenticated:
        raise NotSignedIn("the session's token is no longer valid; sign in again") from None


def check_origin(request: Request) -> None:
    """Refuse a form another site made the browser send (the Origin header names it)."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.url.netloc}"
    if origin is not None and origin != own:
        raise CrossSiteRefused(f"this form came from {origin}, not from {own}")
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise CrossSiteRefused("this form came from another site")


async def checked_form(request: Request, *, signed_in: bool = True) -> dict[str, list[str]]:
    """The posted form after the cross-site checks; `signed_in` forms need the CSRF token."""
    check_origin(request)
    form = await request.form()
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields.setdefault(key, []).append(value)
    if signed_in:
        token = session_token(request)
        if token is None:
            raise NotSignedIn("sign in first")
        sent = (fields.get(CSRF_FIELD) or [""])[0]
        if not hmac.compare_digest(sent, csrf_token(token)):
            raise CrossSiteRefused("the form's session token is missing or does not match")
    return fields


def set_session(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        cookie_name(request),
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/console",
    )


def clear_session(request: Request, response: Response) -> None:
    response.delete_cookie(
        cookie_name(request),
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
