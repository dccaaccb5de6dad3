"""Who may do what on the page: the token, login sessions, and CSRF.

Three ways to prove the token, one rule for each:

* a browser logs in once (``/login``) and gets a session cookie (HttpOnly, SameSite=Strict);
  every POST it makes must also carry the session's CSRF token in the form, and an
  ``Origin`` (or ``Sec-Fetch-Site``) saying it comes from this page;
* a script sends ``Authorization: Bearer <token>`` (browsers never attach that by
  themselves, so no CSRF token is needed);
* a script posts a form with a ``token`` field (the same reasoning).

Sessions live in memory: a restart logs everyone out, which costs one login. The token
is compared in constant time and read fresh (a changed token file counts at once).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

SESSION_COOKIE = "dhwatch_session"
#: a login lasts this long (a working day and a half)
SESSION_SECONDS = 36 * 3600.0
#: the oldest sessions are dropped beyond this many (a misbehaving script cannot fill memory)
MAX_SESSIONS = 1000


@dataclass(frozen=True)
class Session:
    """One logged-in browser."""

    csrf: str
    expires: float
    #: which token it was opened with: a changed token ends every session
    token_digest: bytes


class Sessions:
    """The page's login sessions (in memory) and the token they are checked against."""

    def __init__(self, token: Callable[[], str | None], clock: Callable[[], float] = time.monotonic) -> None:
        self._token = token
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    @property
    def enabled(self) -> bool:
        """Whether a token is configured at all (without one, actions are off)."""
        return bool(self._token())

    def token_ok(self, given: str | None) -> bool:
        """``given`` is the configured token (constant-time; no token configured: never)."""
        expected = self._token()
        if not expected or not given:
            return False
        return hmac.compare_digest(given.strip().encode(), expected.encode())

    def login(self, given: str | None) -> str | None:
        """A new session id when ``given`` is the token, else None."""
        if not self.token_ok(given):
            return None
        now = self._clock()
        self._sessions = {k: v for k, v in self._sessions.items() if v.expires > now}
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = Session(csrf=secrets.token_urlsafe(32), expires=now + SESSION_SECONDS,
                                      token_digest=_digest(given or ""))  # fmt: skip
        return sid

    def logout(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id (None when absent or expired, or when the token was changed or removed)."""
        token = self._token()
        if not sid or not token:
            return None
        found = self._sessions.get(sid)
        if found is None or found.expires <= self._clock():
            return None
        if not hmac.compare_digest(found.token_digest, _digest(token)):
            return None  # the administrator changed the token: log in with the new one
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.strip().encode()).digest()


@dataclass(frozen=True)
class Caller:
    """What a request proved."""

    #: the token was shown: by a session cookie, a Bearer header
    authenticated: bool
    #: the browser session, when the proof was a cookie (its CSRF token goes into forms)
    session: Session | None = None


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def identify(request: Request, sessions: Sessions) -> Caller:
    """Who is asking: a Bearer token, or a session cookie, or nobody."""
    if sessions.token_ok(bearer(request)):
        return Caller(True)
    session = sessions.get(request.cookies.get(SESSION_COOKIE))
    return Caller(session is not None, session)


def cross_site(request: Request) -> bool:
    """True when a browser says this request comes from another site (a forged form, a script elsewhere).

    ``Origin`` must name this page's own host and port; ``Sec-Fetch-Site`` must not
    be ``cross-site`` or ``same-site``. A request with neither (curl, a script) is not a
    browser's cross-site request.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    # host and port only: behind a TLS proxy the browser says https while this server sees http
    own = request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() != own.lower()


def csrf_ok(session: Session | None, given: object) -> bool:
    """The form's CSRF field equals the session's (constant-time)."""
    return session is not None and isinstance(given, str) and hmac.compare_digest(given.encode(), session.csrf.encode())


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this page only (never ``//elsewhere`` or a URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
