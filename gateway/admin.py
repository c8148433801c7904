"""The admin site on the ``admin:`` endpoint: the dashboard, /metrics, /healthz and /readyz.

/healthz answers 200 while the process runs its event loop; /readyz answers
200 only once every listener is bound and the configuration is loaded, and 503
while starting, reloading or stopping, or just after the spool refused a
message, so a load balancer can tell.  Its second line says which configuration
is in force and how the last reload went.  /trace streams the routing decisions
as server-sent events while someone reads it (``gateway trace``).  /metrics is for Prometheus.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

if TYPE_CHECKING:
    from gateway.service import GatewayService

log = Logger(namespace="gateway.admin")


class _Page(Resource):
    """A leaf page of the admin site, of one gateway."""

    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.gateway = gateway


def _set(request: Request, *headers: tuple[bytes, bytes]) -> None:
    """Set response headers (Twisted's Request.setHeader has no annotations)."""
    untyped: Any = request
    for name, value in headers:
        untyped.setHeader(name, value)


def _write(request: Request, data: bytes, *, finish: bool = False) -> None:
    untyped: Any = request
    if data:
        untyped.write(data)
    if finish:
        untyped.finish()


_TEXT = (b"content-type", b"text/plain; charset=utf-8")


class _Health(_Page):
    def render_GET(self, request: Request) -> bytes:
        _set(request, _TEXT)
        return b"ok\n"


class _Ready(_Page):
    def render_GET(self, request: Request) -> bytes:
        _set(request, _TEXT)
        problems = self.gateway.readiness_problems()
        configuration = self.gateway.configuration_line() + "\n"
        if problems:
            request.setResponseCode(503)
            return ("not ready: " + "; ".join(problems) + "\n" + configuration).encode()
        return ("ready\n" + configuration).encode()


class _Metrics(_Page):
    def render_GET(self, request: Request) -> int:
        from gateway.metrics import GatewayMetrics

        if self.gateway.metrics is None:
            self.gateway.metrics = GatewayMetrics(self.gateway)
        accept = request.getHeader(b"accept")
        page = self.gateway.metrics.render(accept.decode("latin-1") if accept else None)
        return _answer_later(request, page, "/metrics")


def _answer_later(request: Request, page: Coroutine[Any, Any, tuple[bytes, str]], what: str) -> int:
    """Answer ``request`` with the (body, content type) ``page`` makes; 500 if it fails,
    nothing if the client hung up meanwhile."""
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def send(answer: tuple[bytes, str]) -> None:
        if gone:
            return  # the client hung up
        body, content_type = answer
        _set(request, (b"content-type", content_type.encode()))
        _write(request, body, finish=True)

    def failed(failure: Failure) -> None:
        log.failure("{what} failed", failure, what=what)
        if gone:
            return
        request.setResponseCode(500)
        _write(request, b"", finish=True)

    Deferred.fromCoroutine(page).addCallbacks(send, failed)
    return NOT_DONE_YET


class _Trace(_Page):
    """/trace: the routing decisions as they happen, as server-sent events (one JSON
    object per event), filtered by ?route=, ?listener= and ?match=."""

    keepalive = 15.0  # seconds between comments that keep idle proxies from closing it

    def render_GET(self, request: Request) -> int:
        from twisted.internet import task

        from gateway.tracing import Watcher

        _set(
            request,
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        )
        state = {"paused": False}

        def send(event: dict[str, Any]) -> bool:
            if state["paused"]:
                return False
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            _write(request, f"data: {data}\n\n".encode())
            return True

        watcher = Watcher(
            send,
            route=_arg(request, "route"),
            listener=_arg(request, "listener"),
            match=_arg(request, "match"),
        )
        tracer = self.gateway.tracer
        stop = tracer.watch(watcher)

        class _Producer:
            def pauseProducing(self) -> None:
                state["paused"] = True

            def resumeProducing(self) -> None:
                state["paused"] = False
                tracer.flush(watcher)

            def stopProducing(self) -> None:
                stop()

        untyped: Any = request
        untyped.registerProducer(_Producer(), True)
        _write(request, b": tracing\n\n")

        def keep_alive() -> None:
            if not state["paused"]:
                _write(request, b": keep-alive\n\n")

        ping = task.LoopingCall(keep_alive)
        ping.clock = self.gateway.reactor
        ping.start(self.keepalive, now=False)

        def gone(_: object) -> None:
            stop()
            if ping.running:
                ping.stop()

        request.notifyFinish().addBoth(gone)
        return NOT_DONE_YET


class _Dashboard(_Page):
    """/ (the dashboard page, see gateway.dashboard) and what people do from it:
    POST /sign-in and /sign-out, GET /queue/ID (show), POST /queue/retry and
    /queue/drop.  The last four need a session signed in with the admin token, and
    the changing ones its CSRF field and a request from this very origin."""

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__(gateway)
        from gateway.admin_auth import AdminSessions
        from gateway.dashboard import Picture

        self.picture = Picture()
        self.sessions = AdminSessions(gateway.reactor.seconds)

    def _token(self) -> str:
        return self.gateway.current().config.admin_token

    def _viewer(self, request: Request, notice: str = "") -> Any:
        from gateway.dashboard import Viewer

        session = self._session(request)
        csrf = self.sessions.csrf(session) if session else ""
        return Viewer(actions=bool(self._token()), csrf=csrf, notice=notice)

    def _session(self, request: Request) -> str | None:
        """The live session the request's cookie names, if any."""
        from gateway.admin_auth import COOKIE

        untyped: Any = request
        cookie = untyped.getCookie(COOKIE.encode())
        return self.sessions.session(cookie.decode("latin-1") if cookie else None, self._token())

    def _headers(self, request: Request) -> None:
        _set(
            request,
            (b"content-security-policy", _CSP),
            (b"cache-control", b"no-store"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin"),
        )

    def render_GET(self, request: Request) -> int | bytes:
        self._headers(request)
        path = _path(request).split("/")
        if path == [""]:
            notice = ""
            for done in ("retried", "dropped"):
                if _arg(request, done):
                    notice = f"{_arg(request, done)} {done}"
            page = self._page(self._viewer(request, notice))
            return _answer_later(request, page, "the dashboard")
        if len(path) == 2 and path[0] == "queue" and path[1]:
            viewer = self._viewer(request)
            if not viewer.signed_in:
                return self._refuse(request, 403, _SIGN_IN_FIRST)
            key = unquote(path[1])
            return _answer_later(request, self._show(request, key, viewer), "showing a delivery")
        if path in (["sign-in"], ["sign-out"]):
            return _see(request, "/#queue-title")  # the forms are on the dashboard
        request.setResponseCode(404)
        _set(request, _TEXT)
        return b"not found\n"

    def render_POST(self, request: Request) -> int | bytes:
        from gateway.admin_auth import COOKIE, Refused, check_origin

        self._headers(request)
        untyped: Any = request  # Twisted's Request methods without annotations
        path = _path(request)
        client = str(getattr(untyped.getClientAddress(), "host", ""))
        tls = bool(untyped.isSecure())
        try:
            check_origin(
                _header(request, b"origin"),
                _header(request, b"sec-fetch-site"),
                _header(request, b"host"),
                tls,
            )
            if path == "sign-in":
                session = self.sessions.sign_in(_arg(request, "token"), self._token(), client)
                untyped.addCookie(
                    COOKIE.encode(),
                    session.encode(),
                    path=b"/",
                    httpOnly=True,
                    sameSite="strict",
                    secure=tls,
                )
                log.info("dashboard: {client} signed in", client=client)
                return _see(request, "/#queue-title")
            if path not in ("sign-out", "queue/retry", "queue/drop"):
                raise Refused(404, "no such action")
            found = self._session(request)
            if found is None:
                raise Refused(403, _SIGN_IN_FIRST)
            self.sessions.check_csrf(found, _arg(request, "csrf"))
        except Refused as refused:
            if path == "sign-in":  # as sshd logs failed logins: for fail2ban and people
                log.warn(
                    "dashboard: sign-in from {client} refused: {reason}",
                    client=client,
                    reason=refused.reason,
                )
            return self._refuse(request, refused.status, refused.reason)
        if path == "sign-out":
            self.sessions.sign_out(found)
            untyped.addCookie(COOKIE.encode(), b"", path=b"/", max_age=b"0")
            return _see(request, "/")
        what = path.removeprefix("queue/")
        work = self._act(request, what, _arg(request, "id"), client)
        return _answer_later(request, work, f"{what} from the dashboard")

    def _refuse(self, request: Request, status: int, reason: str) -> bytes:
        from gateway.dashboard import render_refusal

        request.setResponseCode(status)
        _set(request, (b"content-type", _HTML.encode()))
        return render_refusal(status, reason)

    async def _page(self, viewer: Any) -> tuple[bytes, str]:
        from gateway.dashboard import render

        return await render(self.gateway, self.picture, viewer), _HTML

    async def _show(self, request: Request, key: str, viewer: Any) -> tuple[bytes, str]:
        from gateway.dashboard import render_refusal, render_show
        from gateway.queue_cli import describe

        spool = self.gateway.spool
        found = await spool.find(key) if spool is not None else []
        if spool is None or not found:
            request.setResponseCode(404)
            return render_refusal(404, f"no message or delivery with id {key} in the spool"), _HTML
        record, missing = await describe(spool, found)
        return render_show(record, missing, viewer), _HTML

    async def _act(
        self, request: Request, what: str, delivery_id: str, client: str
    ) -> tuple[bytes, str]:
        from gateway.dashboard import render_refusal

        spool = self.gateway.spool
        entry = await spool.entry(delivery_id) if spool is not None and delivery_id else None
        if spool is None or entry is None:
            request.setResponseCode(404)
            reason = (
                f"no delivery {delivery_id or '(none given)'} in the spool (delivered meanwhile?)"
            )
            return render_refusal(404, reason), _HTML
        if what == "retry":
            await spool.retry([delivery_id], by=f"the dashboard (from {client})")
            if self.gateway.delivery is not None:
                self.gateway.delivery.kick(entry.destination)
            done = "retried"
        elif await spool.drop(delivery_id):
            done = "dropped"
        else:
            request.setResponseCode(404)
            return render_refusal(
                404, f"{delivery_id} left the spool before it could be dropped"
            ), _HTML
        log.info(
            "dashboard: {client} {what} {id} (route {route}, destination {destination})",
            client=client,
            what=done,
            id=delivery_id,
            route=entry.route,
            destination=entry.destination,
        )
        return _see(request, f"/?{done}={quote(delivery_id)}#queue-title"), _HTML


_HTML = "text/html; charset=utf-8"
_SIGN_IN_FIRST = "sign in with the admin token first (on the dashboard, at the queue)"


def _path(request: Request) -> str:
    """The request's path without its query and the slashes around it ("" for /)."""
    return (request.path or b"").decode("utf-8", "replace").strip("/")


def _arg(request: Request, name: str) -> str:
    values = request.args.get(name.encode()) or [b""]
    return str(values[0].decode("utf-8", "replace"))


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _see(request: Request, where: str) -> bytes:
    request.setResponseCode(303)
    _set(request, (b"location", where.encode()), _TEXT)
    return b""


# The page loads nothing from elsewhere, and only its own inline style and script.
_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline';"
    b" connect-src 'self'; img-src data:"
)


class _AdminSite(Site):
    noisy = False  # no "Starting factory" lines each time it opens

    def log(self, request: Any) -> None:
        pass  # no access log: health checks and scrapes every few seconds would fill it


def admin_site(gateway: GatewayService) -> Site:
    make: Any = Resource  # Twisted's Resource and Site have no annotations
    root = make()
    dashboard = _Dashboard(gateway)
    for path in (b"", b"sign-in", b"sign-out", b"queue"):
        root.putChild(path, dashboard)
    root.putChild(b"trace", _Trace(gateway))
    root.putChild(b"healthz", _Health(gateway))
    root.putChild(b"readyz", _Ready(gateway))
    root.putChild(b"metrics", _Metrics(gateway))
    make = _AdminSite
    site: Site = make(root)
    site.displayTracebacks = False
    return site
