"""Who may act on the queue from the dashboard: the admin token, sessions and CSRF.

The operator signs in with the token from ``admin_token_file`` (or
``admin_token``); the gateway answers with a session cookie (HttpOnly,
SameSite=Strict) that lives in memory only, so a restart signs everyone out,
and so does a reload that changes the token.  Every form that changes
something carries a CSRF field, an HMAC of the session under a key made at
start, and a request from another origin (its ``Origin`` or ``Sec-Fetch-Site``
says so) is refused even with both.  Wrong tokens are counted per client
address: after ``FAILURES`` in ``FAILURE_WINDOW`` seconds the client waits.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "gateway_session"
LIFETIME = 8 * 3600.0  # a session ends this long after sign-in, however busy
IDLE = 3600.0  # ... or after this long unused
MOST_SESSIONS = 64  # the oldest goes when one more signs in
FAILURES = 10  # wrong tokens a client may give per window
FAILURE_WINDOW = 600.0


class Refused(Exception):
    """A request the dashboard does not act on: the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Session:
    started: float
    used: float
    token: bytes  # digest of the token it signed in with


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class AdminSessions:
    """Sessions of people signed in to the dashboard, in memory."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, _Session] = {}
        self._failures: dict[str, list[float]] = {}

    def sign_in(self, given: str, token: str, client: str) -> str:
        """A new session id for the right token; Refused otherwise."""
        now = self.clock()
        if not token:
            raise Refused(403, "queue actions are off: routes.yaml sets no admin_token_file")
        failures = [t for t in self._failures.get(client, ()) if now - t < FAILURE_WINDOW]
        if len(failures) >= FAILURES:
            self._failures[client] = failures
            raise Refused(429, "too many wrong tokens from this address; try again later")
        if not hmac.compare_digest(_digest(given), _digest(token)):
            failures.append(now)
            self._failures[client] = failures
            if len(self._failures) > 1024:  # forget the quietest addresses
                for stale in sorted(self._failures, key=lambda c: self._failures[c][-1])[:512]:
                    del self._failures[stale]
            raise Refused(403, "wrong token")
        self._failures.pop(client, None)
        self._expire(now)
        while len(self._sessions) >= MOST_SESSIONS:
            oldest = min(self._sessions, key=lambda s: self._sessions[s].started)
            del self._sessions[oldest]
        session = secrets.token_urlsafe(32)
        self._sessions[session] = _Session(now, now, _digest(token))
        return session

    def session(self, cookie: str | None, token: str) -> str | None:
        """The session ``cookie`` names, if it is live and signed in with today's token."""
        if not cookie or not token:
            return None
        now = self.clock()
        self._expire(now)
        found = self._sessions.get(cookie)
        if found is None or not hmac.compare_digest(found.token, _digest(token)):
            return None
        found.used = now
        return cookie

    def sign_out(self, session: str) -> None:
        self._sessions.pop(session, None)

    def csrf(self, session: str) -> str:
        """The value every changing form of this session carries."""
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, session: str, given: str) -> None:
        if not given or not hmac.compare_digest(self.csrf(session), given):
            raise Refused(403, "the form is stale or from another page (CSRF check failed)")

    def _expire(self, now: float) -> None:
        for name, s in list(self._sessions.items()):
            if now - s.started > LIFETIME or now - s.used > IDLE:
                del self._sessions[name]


def check_origin(origin: str | None, fetch_site: str | None, host: str | None, tls: bool) -> None:
    """Refuse a changing request that a page of another site made the browser send."""
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise Refused(403, f"refused a request from another site (Sec-Fetch-Site: {fetch_site})")
    if origin is None:
        return  # not a browser, or an old one: the cookie and the CSRF field still hold
    expected = f"{'https' if tls else 'http'}://{host or ''}"
    if origin.lower() != expected.lower():
        raise Refused(403, f"refused a request from another origin ({origin})")
